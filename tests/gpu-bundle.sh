#!/bin/sh
# gpu-bundle.sh [BUNDLE_DIR] - packs ccr's GPU checks for a machine that has
# the CUDA toolkit (/usr/local/cuda) but no Debian packages and no network
# (the lent H100/H200 machine; issue 11).
#
# Here (the development machine, with the README's packages and nvcc):
# a release build with CUDA required (build-gpu/), then BUNDLE_DIR
# (default build-gpu/bundle, under 64 MiB) receives
#   bin/  test_cuda and ccr-bench-mlp;
#   lib/  every shared library they load that is not the C library's own
#         or CUDA's: GSL, OpenBLAS (and gfortran, quadmath), Check, cJSON,
#         zlib, as ldd resolves them here;
#   run.sh  the whole GPU run, one command: test_cuda (parity of every
#         CUDA op against the CPU reference), the same under
#         compute-sanitizer when the toolkit has it, then ccr-bench-mlp
#         on the CUDA backend; logs and JSONL into $OUT (or ./gpu-out).
# CUDA's runtime and cuBLAS are taken from the GPU machine's toolkit
# (LD_LIBRARY_PATH gets /usr/local/cuda/lib64 and lib): cuBLAS alone is larger than
# what the device tool carries.
#
# On the GPU machine, from the repository root:
#   bash build-gpu/bundle/run.sh          (run's carry: ["build-gpu/bundle"])
# Exit status: run.sh's is test_cuda's (77 when it finds no GPU).
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"
bundle=${1:-build-gpu/bundle}

meson setup --reconfigure build-gpu --buildtype=release -Dcuda=enabled >/dev/null 2>&1 ||
  meson setup build-gpu --buildtype=release -Dcuda=enabled
ninja -C build-gpu tests/test_cuda experiments/ccr-bench-mlp

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib"
for b in build-gpu/tests/test_cuda build-gpu/experiments/ccr-bench-mlp; do
  cp "$b" "$bundle/bin/"
  # name => path lines of ldd; keep what is neither glibc's nor CUDA's
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' |
    while read -r name path; do
      case $name in
        libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libgcc_s.so*) ;;
        libcuda.so*|libcudart.so*|libcublas.so*|libcublasLt.so*) ;;
        *) cp -L "$path" "$bundle/lib/$name" ;;
      esac
    done
done

cat >"$bundle/run.sh" <<'RUN'
#!/bin/sh
# The GPU run of a ccr bundle (tests/gpu-bundle.sh wrote it): logs and
# JSONL go to $OUT, or ./gpu-out.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-./gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$here/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CK_FORK=no
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
"$here/bin/test_cuda" >"$out/test_cuda.log" 2>&1
rc=$?
echo "test_cuda: exit $rc" | tee -a "$out/summary.txt"
cs=/usr/local/cuda/bin/compute-sanitizer
if [ "$rc" -eq 0 ] && [ -x "$cs" ]; then
  "$cs" --error-exitcode 9 "$here/bin/test_cuda" >"$out/test_cuda.sanitizer.log" 2>&1
  echo "test_cuda under compute-sanitizer: exit $?" | tee -a "$out/summary.txt"
fi
if [ "$rc" -eq 0 ]; then
  "$here/bin/ccr-bench-mlp" --backend cuda --out "$out/bench_mlp_cuda.jsonl" \
    >"$out/bench_mlp_cuda.log" 2>&1
  echo "ccr-bench-mlp --backend cuda: exit $?" | tee -a "$out/summary.txt"
fi
exit "$rc"
RUN
chmod +x "$bundle/run.sh"
du -sh "$bundle"
