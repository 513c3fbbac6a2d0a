#!/bin/sh
# Integration test of ccr-bench (issue 10): a --quick run for every gate (and
# the sign-bit tree's leaf combine) writes one JSONL record;
# analysis/check_results.py checks the settings, the medians, the reference
# timings and the phase shares are present and finite, and an inline reader
# checks that every time is positive, the FLOPs of the sgemm shapes are those
# of the routing (forward + backward = 3 x forward for the same shapes is not
# assumed: eval and train routes may differ) and that the phase shares add up
# to 1, that the noisy gates' draw counts are right and the sign-bit tree's
# per-level seconds are there.  --peer (when /usr/bin/python3 has torch; else printed as skipped)
# records finite positive ratio_to_peer_* for topk, hmoe and signtree and
# "unsupported" for signtree over an FFN bank; a missing --peer-script exits 2.  Bad arguments exit 2 with one line on stderr and leave no output
# file.  analysis/plots.py constwork turns the records into a PNG.  Nothing here depends on how long anything took.
# Usage: driver_bench.sh CCR_BENCH SOURCE_ROOT
set -eu
prog=$1
src=$2
py=/usr/bin/python3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-bench-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$prog" --help >"$tmp/help"
grep -q -- "--quick" "$tmp/help" || { echo "--help does not mention --quick"; exit 1; }

for g in none dense topk hmoe switch signtree "signtree --combine leaf"; do
  # shellcheck disable=SC2086
  "$prog" --quick --gate $g --repeat 2 --threads 1 --out "$tmp/one.jsonl" >"$tmp/sum" 2>"$tmp/err" ||
    { echo "ccr-bench --gate $g failed"; cat "$tmp/err"; exit 1; }
  [ "$(wc -l < "$tmp/one.jsonl")" -eq 1 ] || { echo "--gate $g: not one record"; exit 1; }
  grep -q 'ratio' "$tmp/sum" || { echo "--gate $g: no summary on stdout"; exit 1; }
  cat "$tmp/one.jsonl" >>"$tmp/all.jsonl"
done

if [ ! -x "$py" ]; then echo "skip: no $py"; exit 77; fi
times=seconds_fwd,seconds_fwdbwd,seconds_step,seconds_gate,seconds_gate_train,seconds_zero_grad,seconds_adam,seconds_sgemm_shapes_fwd,seconds_sgemm_shapes_fwdbwd,seconds_sgemm_square,seconds_dense_fwd,seconds_dense_fwdbwd,seconds_copy
$py "$src/analysis/check_results.py" "$tmp/all.jsonl" --min-records 7 \
  --require gate,experts,k,groups,k2,depth,combine,bank,blas_core_source,quick,phase_method \
  --finite d_in,hidden,d_out,batch,threads,repeat,params,$times,gflops,gflops_sgemm_shapes,gflops_sgemm_square,gflops_dense,ratio_to_sgemm,ratio_to_sgemm_fwd,ratio_to_sgemm_square,ratio_to_dense,ratio_to_dense_fwd,copy_gbs,phase_gate,phase_expert_gemm,phase_dispatch_combine,phase_optimiser,flops_fwd,flops_fwdbwd,flops_sgemm_shapes_fwd,flops_sgemm_shapes_fwdbwd,dense_hidden,sgemm_square_n,seconds_noise_draws,noise_draws_per_example

$py - "$tmp/all.jsonl" "$times" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
times = sys.argv[2].split(",")
gates = [r["gate"] + ("-" + r["combine"] if r["gate"] == "signtree" else "") for r in recs]
assert gates == ["none", "dense", "topk", "hmoe", "switch", "signtree-path", "signtree-leaf"], gates
for r, tag in zip(recs, gates):
    assert r["driver"] == "ccr-bench" and r["quick"] is True, tag
    assert r["repeat"] == 2 and r["threads"] == 1 and r["blas_threads"] == 1, tag
    assert r["batch"] == 64 and r["d_in"] == 16 and r["d_out"] == 16, tag
    for t in times:
        assert r[t] > 0, (tag, t, r[t])
    for f in ("gflops", "ratio_to_sgemm", "ratio_to_dense", "copy_gbs"):
        assert r[f] > 0, (tag, f)
    assert abs(r["ratio_to_sgemm"] - r["seconds_sgemm_shapes_fwdbwd"] / r["seconds_fwdbwd"]) < 1e-9 * r["ratio_to_sgemm"], tag
    assert abs(r["ratio_to_dense"] - r["seconds_dense_fwdbwd"] / r["seconds_fwdbwd"]) < 1e-9 * r["ratio_to_dense"], tag
    share = r["phase_gate"] + r["phase_expert_gemm"] + r["phase_dispatch_combine"] + r["phase_optimiser"]
    assert abs(share - 1) < 1e-9, (tag, share)
    # The sgemm shapes are the routing's: every routed (example, matrix)
    # pair costs the matrix's forward FLOPs, backward twice that.
    per = 2 * (r["d_in"] * r["hidden"] + r["hidden"] * r["d_out"]) if r["bank"] == "ffn" else 2 * r["d_in"] * r["d_out"]
    assert r["flops_sgemm_shapes_fwd"] % per == 0 and r["flops_sgemm_shapes_fwdbwd"] % (3 * per) == 0, tag
    assert 0 < r["flops_sgemm_shapes_fwd"] <= r["flops_fwd"], tag
    assert 0 < r["flops_sgemm_shapes_fwdbwd"] <= r["flops_fwdbwd"], tag
    # The noisy gates' draws reference: topk one per expert, hmoe the
    # primary's a plus bs per selected group, none for the rest.
    want = {"topk": r["experts"],
            "hmoe": r["groups"] + r["k_groups"] * (r["experts"] // r["groups"])}.get(r["gate"], 0)
    assert r["noise_draws_per_example"] == want, (tag, r["noise_draws_per_example"], want)
    assert r["seconds_noise_draws"] >= 0 and (want == 0 or r["seconds_noise_draws"] > 0), tag
    # The tree's per-level seconds: one entry per level of a path tree (one
    # for a leaf tree's leaves), the forward and backward positive, inside the layer's own forward + backward time.
    if r["gate"] == "signtree":
        lv = [r["level_seconds_" + k] for k in ("fwd", "bwd", "dots")]
        n = r["depth"] + 1 if r["combine"] == "path" else 1
        assert all(len(v) == n for v in lv), tag
        assert all(lv[0][l] > 0 and lv[1][l] > 0 for l in range(n)), (tag, lv)
        assert r["group_threads"] == 1, tag
        assert sum(map(sum, lv)) < r["seconds_fwdbwd_mean"], (tag, lv)
    else:
        assert "level_seconds_fwd" not in r, tag
print("driver_bench: records ok")
PY

# The target-2 figure (analysis/plots.py constwork) draws these records.
if $py -c 'import matplotlib' 2>/dev/null; then
  $py "$src/analysis/plots.py" constwork "$tmp/all.jsonl" --out "$tmp/cw.png" 2>/dev/null
  [ "$(head -c 4 "$tmp/cw.png" | od -An -c | tr -d ' ')" = '211PNG' ] || { echo "plots.py constwork: not a PNG"; exit 1; }
fi

# --peer (PyTorch peers, analysis/peer_torch.py): topk, hmoe and signtree get
# finite positive ratio_to_peer_* per peer; a layer the peers lack (signtree
# over an FFN bank) is recorded as unsupported,
# without ratios.  Skipped (the rest still checked) without python3-torch.
if "$py" -c 'import torch' 2>/dev/null; then
  for g in topk hmoe signtree "signtree --bank ffn"; do
    # shellcheck disable=SC2086
    "$prog" --quick --gate $g --peer --peer-script "$src/analysis/peer_torch.py" --repeat 2 \
      --threads 1 --out "$tmp/peer-$(echo $g | tr -d ' -').jsonl" >"$tmp/sum" 2>"$tmp/err" ||
      { echo "ccr-bench --peer --gate $g failed"; cat "$tmp/err"; exit 1; }
    grep -q 'PyTorch peers' "$tmp/sum" || { echo "--peer --gate $g: no peer summary"; exit 1; }
  done
  $py - "$tmp/peer-topk.jsonl" "$tmp/peer-hmoe.jsonl" "$tmp/peer-signtree.jsonl" \
      "$tmp/peer-signtreebankffn.jsonl" <<'PY'
import json, math, sys
for path in sys.argv[1:4]:
    r = json.loads(open(path).read())
    assert r["peer"] is True and r["peer_supported"] is True and r["peer_threads"] == 1, r
    for n in ("conventional", "strong_autograd", "strong"):
        for f in ("seconds_peer_" + n, "ratio_to_peer_" + n):
            assert math.isfinite(r[f]) and r[f] > 0, (f, r[f])
        assert abs(r["ratio_to_peer_" + n] - r["seconds_peer_" + n] / r["seconds_fwdbwd"]) < 1e-9 * r["ratio_to_peer_" + n]
h = json.loads(open(sys.argv[4]).read())
assert h["peer"] is True and h["peer_supported"] is False and h["peer_unsupported"], h
assert not any(k.startswith("ratio_to_peer") for k in h), h
print("driver_bench: --peer ok")
PY
else
  echo "driver_bench: --peer skipped (skip: no PyTorch for $py)"
fi
rc=0
"$prog" --quick --peer --peer-script "$tmp/none.py" --out "$tmp/bad.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
if [ "$rc" -ne 2 ] || [ -e "$tmp/bad.jsonl" ]; then
  echo "--peer with a missing script: exit $rc, want 2, no output"; exit 1
fi

# --backend cuda: with a GPU, one record of the device run (the gate is not
# timed alone there: phase_gate_dispatch_combine instead of phase_gate);
# without one (or without CUDA in the build), exit 1 naming the backend and
# no output file.
rc=0
"$prog" --quick --backend cuda --repeat 2 --out "$tmp/cuda.jsonl" >"$tmp/sum" 2>"$tmp/err" || rc=$?
if [ "$rc" -eq 0 ]; then
  [ "$(wc -l < "$tmp/cuda.jsonl")" -eq 1 ] || { echo "--backend cuda: not one record"; exit 1; }
  grep -q '"phase_gate_dispatch_combine": [0-9-]' "$tmp/cuda.jsonl" &&
    ! grep -q '"seconds_gate"' "$tmp/cuda.jsonl" &&
    grep -q '"math": "fp32"' "$tmp/cuda.jsonl" || { echo "--backend cuda: record fields"; exit 1; }
  echo "driver_bench: --backend cuda ran on the GPU"
else
  [ "$rc" -eq 1 ] && grep -q "backend" "$tmp/err" && [ ! -e "$tmp/cuda.jsonl" ] ||
    { echo "--backend cuda without a GPU: exit $rc, want 1 and no output"; cat "$tmp/err"; exit 1; }
  echo "driver_bench: --backend cuda refused cleanly (no GPU here)"
fi

# Bad arguments: exit 2, one line on stderr, no output file.
for args in "--gate bogus" "--batch -4" "--batch 0" "--d-in 0" "--hidden x" "--d-out 1e3" \
            "--threads 0" "--repeat 0" "--gate none --experts 4" "--gate hmoe --groups 3" \
            "--bogus 1" "--gate" "--out" "--peer-script" "--backend gpu" "--backend" \
            "--math tf32" "--math fp16" \
            "--backend cuda --peer"; do
  rc=0
  # shellcheck disable=SC2086
  "$prog" --quick $args --out "$tmp/bad.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "ccr-bench $args: exit $rc, want 2"; cat "$tmp/err"; exit 1; }
  [ ! -e "$tmp/bad.jsonl" ] || { echo "ccr-bench $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "ccr-bench $args: not one line:"; cat "$tmp/err"; exit 1; }
done
echo "driver_bench: bad arguments ok"
