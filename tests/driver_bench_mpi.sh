#!/bin/sh
# ccr-bench under mpirun (issue 12): on 2 processes the expert-parallel
# layer alone, for topk and the sign-bit tree (its straight-through
# backward across ranks); rank 0 writes one record with ranks = 2, positive
# times and its all-to-all bytes.  A one-process driver (ccr-bench-mlp)
# refuses to start under mpirun (exit 2, no output).  Nothing here depends
# on how long anything took.
# Usage: driver_bench_mpi.sh CCR_BENCH CCR_BENCH_MLP MPI_RUN
set -eu
prog=$1
mlp=$2
run=$3
py=/usr/bin/python3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-bench-mpi.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1
for g in topk signtree; do
  "$run" 2 "$prog" --quick --gate "$g" --repeat 2 --out "$tmp/$g.jsonl" >"$tmp/sum" 2>"$tmp/err" ||
    { echo "mpirun -np 2 ccr-bench --gate $g failed"; cat "$tmp/err"; exit 1; }
  [ "$(wc -l < "$tmp/$g.jsonl")" -eq 1 ] || { echo "--gate $g: not one record"; exit 1; }
  [ "$(grep -c '(2 ranks)' "$tmp/sum")" -eq 1 ] || { echo "--gate $g: not one summary"; exit 1; }
done
rc=0
"$run" 2 "$mlp" --quick --out "$tmp/bad.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
[ "$rc" -ne 0 ] && [ ! -e "$tmp/bad.jsonl" ] && grep -q "runs in one process" "$tmp/err" ||
  { echo "ccr-bench-mlp under mpirun: exit $rc, want a refusal"; cat "$tmp/err"; exit 1; }
if [ ! -x "$py" ]; then echo "skip: no $py"; exit 77; fi
$py - "$tmp/topk.jsonl" "$tmp/signtree.jsonl" <<'PY'
import json, sys
for f in sys.argv[1:]:
    r = json.loads(open(f).readline())
    assert r["ranks"] == 2 and r["batch"] == 64, f
    for k in ("seconds_fwd", "seconds_fwdbwd", "seconds_step", "gflops", "alltoall_bytes_fwdbwd",
              "alltoall_bytes_per_step", "seconds_alltoall"):
        assert r[k] > 0, (f, k, r[k])
    assert r["seconds_compute"] >= 0 and r["allreduce_bytes_per_step"] >= 0
print("driver_bench_mpi: topk and signtree on 2 processes")
PY
