#!/bin/sh
# ccr-train under mpirun (issue 12): a conditional network (topk, its aux
# losses on) trained --quick on 3 processes gives the run of one process to
# float rounding - the same accuracies, losses within 1e-6 relative - with
# one JSONL file, written by rank 0, whose records say ranks = 3 and carry
# the communication per step (non-zero with 3 ranks, zero in one process);
# --save on 3 processes writes (rank 0) the file one process writes - the
# same tensors in the same order and shapes, the banks whole, the values to
# float rounding (1e-4 relative per tensor after the epoch).
# Refused on several processes: a batch smaller than the process count,
# --backend cuda.  OpenBLAS runs one thread in both runs (mpirun binds each
# process to a core), so the comparison does not depend on thread counts.
# Nothing here depends on how long anything took.
# Usage: driver_train_mpi.sh CCR_TRAIN MPI_RUN
set -eu
prog=$1
run=$2
py=/usr/bin/python3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-train-mpi.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1
args="--quick --gate topk --experts 8 --k 2 --seed 3"
# shellcheck disable=SC2086
"$prog" $args --out "$tmp/one.jsonl" --save "$tmp/one.st" 2>"$tmp/err1" ||
  { cat "$tmp/err1"; exit 1; }
# shellcheck disable=SC2086
"$run" 3 "$prog" $args --out "$tmp/three.jsonl" --save "$tmp/three.st" 2>"$tmp/err3" ||
  { cat "$tmp/err3"; exit 1; }
set -- "$tmp"/*.jsonl* "$tmp"/*.st*
[ "$#" -eq 4 ] || { echo "more than rank 0's output files"; ls "$tmp"; exit 1; }
grep -q "3 processes" "$tmp/err3" || { echo "rank 0 did not report 3 processes"; exit 1; }
[ "$(grep -c '^epoch 1:' "$tmp/err3")" -eq 1 ] || { echo "not one summary line"; exit 1; }
if [ ! -x "$py" ]; then echo "skip: no $py"; exit 77; fi
$py - "$tmp/one.jsonl" "$tmp/three.jsonl" <<'PY'
import json, sys
one = [json.loads(l) for l in open(sys.argv[1])]
three = [json.loads(l) for l in open(sys.argv[2])]
assert len(one) == len(three) >= 1, (len(one), len(three))
for a, b in zip(one, three):
    assert a["ranks"] == 1 and b["ranks"] == 3, (a["ranks"], b["ranks"])
    for k in ("train_acc", "valid_acc", "test_acc"):
        assert a[k] == b[k], (k, a[k], b[k])
    for k in ("train_loss", "valid_loss", "test_loss", "train_aux_loss", "cv_importance"):
        assert abs(a[k] - b[k]) <= 1e-6 * abs(a[k]), (k, a[k], b[k])
    assert a["alltoall_bytes_per_step"] == 0 and a["allreduce_bytes_per_step"] == 0
    assert b["alltoall_bytes_per_step"] > 0 and b["allreduce_bytes_per_step"] > 0
    assert b["seconds_compute"] > 0 and b["seconds_alltoall"] >= 0
print("driver_train_mpi: 3 processes = 1 process (losses to 1e-6, same accuracies)")
PY
$py - "$tmp/one.st" "$tmp/three.st" <<'PY'
import json, struct, sys
import numpy as np
def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    meta = head.pop("__metadata__", {})
    body = raw[8 + n:]
    order = sorted(head, key=lambda k: head[k]["data_offsets"][0])
    return meta, order, {k: np.frombuffer(body[head[k]["data_offsets"][0]:head[k]["data_offsets"][1]],
                                          dtype="<f4").reshape(head[k]["shape"]) for k in order}
m1, o1, t1 = load(sys.argv[1])
m3, o3, t3 = load(sys.argv[2])
assert m1 == m3, (m1, m3)
assert o1 == o3, (o1, o3)
for k in o1:
    a, b = t1[k], t3[k]
    assert a.shape == b.shape, (k, a.shape, b.shape)
    err = float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(a)), 1e-30)
    assert err <= 1e-4, (k, err)
banks = [k for k in o1 if ".experts." in k]
assert banks and all(t3[k].shape[0] == 8 for k in banks), banks
print("driver_train_mpi: --save on 3 processes = one process's file (%d tensors)" % len(o1))
PY
for bad in "--quick --batch 2" "--quick --backend cuda"; do
  rc=0
  # shellcheck disable=SC2086
  "$run" 3 "$prog" $bad --out "$tmp/bad.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
  [ "$rc" -ne 0 ] && [ ! -e "$tmp/bad.jsonl" ] ||
    { echo "mpirun -np 3 ccr-train $bad: exit $rc, want an error and no output"; exit 1; }
  grep -q "processes\|mpirun" "$tmp/err" || { echo "$bad: no reason given"; cat "$tmp/err"; exit 1; }
done
echo "driver_train_mpi: refusals ok"
