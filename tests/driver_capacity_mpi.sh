#!/bin/sh
# ccr-capacity under mpirun (issue 12): on 2 processes every point's layer
# is expert-parallel; rank 0 alone writes one record per point, with
# ranks = 2, the same parameters and analytic FLOPs as one process, and
# positive times (the trees with their default straight-through backward),
# and the communication per fwd+bwd step (bytes and seconds of the
# all-to-alls and all-reduces, positive) that one process does not report.
# Nothing here depends on how long anything took.
# Usage: driver_capacity_mpi.sh CCR_CAPACITY MPI_RUN
set -eu
prog=$1
run=$2
py=/usr/bin/python3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-cap-mpi.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1
args="--quick --gates none,topk,hmoe,switch,signtree --seconds 0.01"
# shellcheck disable=SC2086
"$prog" $args --out "$tmp/one.jsonl" >/dev/null 2>"$tmp/err1" || { cat "$tmp/err1"; exit 1; }
# shellcheck disable=SC2086
"$run" 2 "$prog" $args --out "$tmp/two.jsonl" >/dev/null 2>"$tmp/err2" || { cat "$tmp/err2"; exit 1; }
set -- "$tmp"/*.jsonl*
[ "$#" -eq 2 ] || { echo "more than rank 0's output file"; ls "$tmp"; exit 1; }
if [ ! -x "$py" ]; then echo "skip: no $py"; exit 77; fi
$py - "$tmp/one.jsonl" "$tmp/two.jsonl" <<'PY'
import json, sys
one = [json.loads(l) for l in open(sys.argv[1])]
two = [json.loads(l) for l in open(sys.argv[2])]
assert len(one) == len(two) > 0, (len(one), len(two))
for a, b in zip(one, two):
    assert (a["series"], a["knob_value"]) == (b["series"], b["knob_value"])
    assert a["ranks"] == 1 and b["ranks"] == 2
    assert a["params"] == b["params"] and a["flops_fwd_analytic"] == b["flops_fwd_analytic"]
    assert b["fwd_seconds_per_example"] > 0 and b["fwdbwd_seconds_per_example"] > 0
    assert "gate_fwd_seconds_per_example" not in b
    for k in ("alltoall_bytes_per_step", "seconds_alltoall", "seconds_allreduce"):
        assert b[k] > 0 and k not in a, (k, b.get(k))
    assert b["seconds_compute"] >= 0 and b["allreduce_bytes_per_step"] >= 0
print("driver_capacity_mpi: %d points on 2 processes" % len(two))
PY
