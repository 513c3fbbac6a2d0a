#!/bin/sh
# gpu-bundle.sh [BUNDLE_DIR] - packs ccr's GPU checks and benchmarks for a
# machine that has the CUDA toolkit (/usr/local/cuda) but no Debian
# packages and no network (the lent H100/H200 machine; issue 11).
#
# Here (the development machine, with the README's packages and nvcc):
# a release build with CUDA required (build-gpu/), then BUNDLE_DIR
# (default build-gpu/bundle, checked to stay under 64 MiB) receives
#   bin/  test_cuda (every CUDA kernel-table op against the CPU reference),
#         test_cuda_cond (conditional layers, every gate, CPU against CUDA),
#         test_cuda_lm (the language model's ops and the whole model),
#         ccr-bench, ccr-capacity, ccr-bench-mlp and ccr-lm, and the labs of
#         cuda/dev (grouped_gemm_lab, combine_lab);
#   data/ gcide-head.gz: the first 3,000,000 bytes of Debian's GCIDE text
#         (dict-gcide), gzipped (about 1 MB), ccr-lm's corpus there;
#   lib/  every shared library they load that is not the C library's own
#         or CUDA's: GSL, OpenBLAS (and gfortran, quadmath), Check, cJSON,
#         zlib, libstdc++, as ldd resolves them here;
#   BUILD_INFO  the commit (git describe), the date, nvcc's version;
#   run.sh  the whole GPU run, one command (below).
# CUDA's runtime and cuBLAS are taken from the GPU machine's toolkit
# (LD_LIBRARY_PATH gets /usr/local/cuda/lib64 and lib): cuBLAS alone is
# larger than what the device tool carries.
#
# On the GPU machine, from the repository root:
#   bash build-gpu/bundle/run.sh          (run's carry: ["build-gpu/bundle"])
# run.sh runs these steps in this order, each with its stdout and stderr in
# $OUT/<step>.log (OUT defaults to ./gpu-out), its exit status and seconds
# appended to $OUT/summary.txt, and goes on after a failed step:
#   test_cuda, test_cuda.memcheck            the kernel-table parity suite,
#   test_cuda_cond, test_cuda_cond.memcheck  the conditional-layer parity
#         suite, each plain and under compute-sanitizer (memcheck) when the
#         toolkit has it;
#   test_cuda_lm, test_cuda_lm.memcheck  the language model's parity suite;
#   bench_topk        ccr-bench --backend cuda, topk, B = 16384, d = 1024,
#                     h = 4096, E = 64, k = 2 (issue 11's target shape):
#                     bench_topk_cuda.jsonl;
#   bench_topk_tf32, bench_topk_bf16  the same with --math tf32 / bf16:
#                     bench_topk_cuda_tf32.jsonl, bench_topk_cuda_bf16.jsonl;
#   lab_gemm, lab_combine  cuda/dev's grouped GEMM versions on the target's
#                     two bank layers and on E = 4096 tiny groups, and the
#                     combine versions: lab_grouped_gemm.jsonl,
#                     lab_combine.jsonl;
#   capacity_experts  ccr-capacity --backend cuda, none/topk/hmoe/switch,
#                     E = 4 .. 4096 (d 64, h 256, k 4, batch 4096):
#                     capacity_experts_cuda.jsonl;
#   capacity_path, capacity_leaf  ccr-capacity --backend cuda, the signtree
#                     path and leaf trees, depth 0 .. 20 (d 32: depth 20's
#                     path tree is 2^21 - 1 node matrices, 8.9 GB of values
#                     drawn on the host, which is most of its time; batch
#                     4096): capacity_path_cuda.jsonl, capacity_leaf_cuda.jsonl
#                     (a run cut short leaves its points in <file>.partial);
#   bench_mlp         ccr-bench-mlp --backend cuda: bench_mlp_cuda.jsonl;
#   lm_cuda, lm_cpu   ccr-lm, topk E = 64, k = 2, d = 256, expert hidden
#                     1024, batch 64 x unroll 20, 100k tokens of the GCIDE
#                     slice, on the GPU and on the machine's CPU cores:
#                     lm_cuda.jsonl, lm_cpu.jsonl (tokens/s side by side).
# Every step runs under timeout(1) with its own cap, cut to what is left of
# RUN_BUDGET seconds (default 470, for the device tool's 600 s per command);
# a step that finds less than 15 s left is skipped, and says so.  STEPS
# (space-separated step names, default all) runs only those, e.g.
#   STEPS="test_cuda_cond bench_topk" bash build-gpu/bundle/run.sh
# Exit status: 77 when test_cuda finds no GPU (the other steps are then
# skipped), 0 when every step run exited 0 and none was skipped for time,
# 1 otherwise.
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"
bundle=${1:-build-gpu/bundle}
bins="tests/test_cuda tests/test_cuda_cond tests/test_cuda_lm experiments/ccr-bench
      experiments/ccr-capacity experiments/ccr-bench-mlp experiments/ccr-lm
      cuda/dev/grouped_gemm_lab cuda/dev/combine_lab"

# Without MPI and NCCL: the GPU machine has no mpirun, and NCCL's library
# alone would outgrow what the device tool carries.
meson setup --reconfigure build-gpu --buildtype=release -Dcuda=enabled -Dmpi=disabled \
  -Dnccl=disabled >/dev/null 2>&1 ||
  meson setup build-gpu --buildtype=release -Dcuda=enabled -Dmpi=disabled -Dnccl=disabled
# shellcheck disable=SC2086  # bins is a list of target names without blanks
ninja -C build-gpu $bins

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib" "$bundle/data"
gcide=/usr/share/dictd/gcide.dict.dz
if [ -r "$gcide" ]; then
  { gzip -dc "$gcide" || true; } | head -c 3000000 | gzip -9 >"$bundle/data/gcide-head.gz"
fi
for t in $bins; do
  b=build-gpu/$t
  cp "$b" "$bundle/bin/"
  # name => path lines of ldd; keep what is neither glibc's nor CUDA's
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' |
    while read -r name path; do
      case $name in
        libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libgcc_s.so*) ;;
        libcuda.so*|libcudart.so*|libcublas.so*|libcublasLt.so*) ;;
        *) [ -e "$bundle/lib/$name" ] || cp -L "$path" "$bundle/lib/$name" ;;
      esac
    done
done
{
  echo "commit: $(git -C "$src" describe --always --dirty 2>/dev/null || echo unknown)"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo unknown)"
} >"$bundle/BUILD_INFO"

cat >"$bundle/run.sh" <<'RUN'
#!/bin/sh
# The GPU run of a ccr bundle (tests/gpu-bundle.sh wrote it and documents
# the steps): logs, JSONL and summary.txt go to $OUT, or ./gpu-out.
# RUN_BUDGET (seconds, default 470) bounds the whole run; STEPS (names,
# default all) selects steps.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-./gpu-out}
budget=${RUN_BUDGET:-470}
steps=${STEPS:-all}
mkdir -p "$out"
export LD_LIBRARY_PATH="$here/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CK_FORK=no   # Check must not fork: a forked child must not use CUDA
summary=$out/summary.txt
start=$(date +%s)
gpu=yes
failed=0
cuda_rc=0

cp "$here/BUILD_INFO" "$out/BUILD_INFO" 2>/dev/null
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
nvidia-smi -q >"$out/nvidia-smi-q.txt" 2>&1
{ echo "run: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n), budget ${budget}s, steps: $steps"
  cat "$here/BUILD_INFO" 2>/dev/null; } >"$summary"

cs=$(command -v compute-sanitizer 2>/dev/null || true)
if [ -z "$cs" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  cs=/usr/local/cuda/bin/compute-sanitizer
fi
if command -v timeout >/dev/null 2>&1; then to=yes; else to=no; fi

# record NAME EXIT SECONDS NOTE: one line of the summary (and stdout)
record() {
  printf '%-24s exit %-4s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$summary"
}

# step NAME CAP COMMAND...: runs COMMAND with stdout and stderr in
# $out/NAME.log under a limit of CAP seconds, cut to what is left of the
# budget, and records its exit status.  Sets rc (-1 when it did not run).
step() {
  name=$1 cap=$2
  shift 2
  rc=-1
  case " $steps " in *" all "*|*" $name "*) ;; *) return 0 ;; esac
  if [ "$gpu" = no ]; then
    record "$name" - 0 "skipped: no GPU (see test_cuda.log)"
    return 0
  fi
  left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt 15 ]; then
    record "$name" - 0 "SKIPPED: ${left}s left of the ${budget}s budget"
    failed=1
    return 0
  fi
  lim=$cap
  [ "$left" -lt "$lim" ] && lim=$left
  t0=$(date +%s)
  if [ "$to" = yes ]; then
    timeout -k 10 "$lim" "$@" >"$out/$name.log" 2>&1
  else
    "$@" >"$out/$name.log" 2>&1
  fi
  rc=$?
  t=$(($(date +%s) - t0))
  case $rc in
    0) note=ok ;;
    77) note="skipped by the program (77)" ;;
    124|137) note="TIMEOUT at ${lim}s"; failed=1 ;;
    *) note=FAILED; failed=1 ;;
  esac
  record "$name" "$rc" "$t" "$note"
}

# sanitized NAME CAP PROGRAM: PROGRAM under compute-sanitizer's memcheck
sanitized() {
  case " $steps " in *" all "*|*" $1 "*) ;; *) return 0 ;; esac
  if [ "$gpu" = yes ] && [ -z "$cs" ]; then
    record "$1" - 0 "skipped: no compute-sanitizer in PATH or /usr/local/cuda/bin"
    return 0
  fi
  step "$1" "$2" "$cs" --tool memcheck --error-exitcode 9 "$3"
}

step test_cuda 90 "$here/bin/test_cuda"
if [ "$rc" -eq 77 ]; then
  gpu=no
  cuda_rc=77
fi
sanitized test_cuda.memcheck 150 "$here/bin/test_cuda"
step test_cuda_cond 90 "$here/bin/test_cuda_cond"
step test_cuda_lm 60 "$here/bin/test_cuda_lm"
sanitized test_cuda_cond.memcheck 180 "$here/bin/test_cuda_cond"
sanitized test_cuda_lm.memcheck 120 "$here/bin/test_cuda_lm"

step bench_topk 120 "$here/bin/ccr-bench" --backend cuda --gate topk --experts 64 --k 2 \
  --batch 16384 --d-in 1024 --hidden 4096 --d-out 1024 --repeat 5 --seed 1 \
  --out "$out/bench_topk_cuda.jsonl"

for m in tf32 bf16; do
  step "bench_topk_$m" 90 "$here/bin/ccr-bench" --backend cuda --math "$m" --gate topk \
    --experts 64 --k 2 --batch 16384 --d-in 1024 --hidden 4096 --d-out 1024 --repeat 5 \
    --seed 1 --out "$out/bench_topk_cuda_$m.jsonl"
done

# labs: one JSON line per version (the lines starting with "{" of the log)
step lab_gemm 60 sh -c "\"$here/bin/grouped_gemm_lab\" 32768 1024 4096 64 all &&
  \"$here/bin/grouped_gemm_lab\" 32768 4096 1024 64 all &&
  \"$here/bin/grouped_gemm_lab\" 32768 1024 64 4096 all"
grep "^{" "$out/lab_gemm.log" >"$out/lab_grouped_gemm.jsonl" 2>/dev/null
step lab_combine 30 sh -c "\"$here/bin/combine_lab\" 16384 2 1024 64 0 1 &&
  \"$here/bin/combine_lab\" 16384 2 1023 64 0.1 1"
grep "^{" "$out/lab_combine.log" >"$out/lab_combine.jsonl" 2>/dev/null

step capacity_experts 120 "$here/bin/ccr-capacity" --backend cuda \
  --gates none,topk,hmoe,switch --experts 4,16,64,256,1024,4096 \
  --batch 4096 --seconds 0.25 --max-gib 16 --seed 1 \
  --out "$out/capacity_experts_cuda.jsonl"

depths=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20
step capacity_path 110 "$here/bin/ccr-capacity" --backend cuda --gates signtree-path \
  --depths "$depths" --d 32 --batch 4096 --seconds 0.15 --max-gib 16 --seed 1 \
  --out "$out/capacity_path_cuda.jsonl"
step capacity_leaf 70 "$here/bin/ccr-capacity" --backend cuda --gates signtree-leaf \
  --depths "$depths" --d 32 --batch 4096 --seconds 0.15 --max-gib 16 --seed 1 \
  --out "$out/capacity_leaf_cuda.jsonl"

step bench_mlp 60 "$here/bin/ccr-bench-mlp" --backend cuda --out "$out/bench_mlp_cuda.jsonl"

lm="--corpus $here/data/gcide-head.gz --gate topk --experts 64 --k 2 --d 256
    --expert-hidden 1024 --batch 64 --unroll 20 --max-tokens 100000 --seed 1"
# shellcheck disable=SC2086  # lm is a list of options without blanks
step lm_cuda 90 "$here/bin/ccr-lm" $lm --backend cuda --out "$out/lm_cuda.jsonl"
# shellcheck disable=SC2086
step lm_cpu 90 "$here/bin/ccr-lm" $lm --out "$out/lm_cpu.jsonl"

echo "total: $(($(date +%s) - start))s" | tee -a "$summary"
if [ "$cuda_rc" -eq 77 ]; then
  exit 77
fi
exit "$failed"
RUN
chmod +x "$bundle/run.sh"

size=$(du -sm "$bundle" | cut -f1)
du -sh "$bundle"/bin/* "$bundle"/lib
echo "$bundle: ${size} MiB"
if [ "$size" -ge 64 ]; then
  echo "gpu-bundle.sh: $bundle is ${size} MiB, over the device tool's 64 MiB" >&2
  exit 1
fi
