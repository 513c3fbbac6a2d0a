#!/bin/sh
# ccr-lm under mpirun (issue 12): the LSTM-MoE language model trained on
# several processes gives the run of one process to float rounding - train,
# validation and test perplexities within 1e-6 relative, the same parameter
# counts (the bank is split, the counts are global) - with one JSONL file,
# written by rank 0, whose record says ranks = P and carries the
# communication per step (non-zero on several ranks, zero in one process).
# topk on 3 processes (6 streams, 2 each), Switch on 2 (5 streams: 2 and
# 3, uneven) and the sign-bit path tree of depth 3 on 3 (its top two levels
# replicated, the four subtrees below sharded), dropout on.  Refused on several processes: a batch smaller
# than the process count, --backend cuda.  OpenBLAS runs one thread in every
# run.  Skips (77) without the GCIDE corpus.  Nothing here depends on time.
# Usage: driver_lm_mpi.sh CCR_LM MPI_RUN
set -eu
prog=$1
run=$2
py=/usr/bin/python3
corpus=/usr/share/dictd/gcide.dict.dz
if [ ! -r "$corpus" ]; then echo "skip: no $corpus (dict-gcide)"; exit 77; fi
if [ ! -x "$py" ]; then echo "skip: no $py"; exit 77; fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-lm-mpi.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1

compare() {  # compare NAME P ARGS...: one process against P processes
  name=$1 np=$2
  shift 2
  "$prog" "$@" --out "$tmp/$name.one.jsonl" 2>"$tmp/err1" || { cat "$tmp/err1"; exit 1; }
  "$run" "$np" "$prog" "$@" --out "$tmp/$name.many.jsonl" 2>"$tmp/errn" ||
    { cat "$tmp/errn"; exit 1; }
  grep -q "$np processes" "$tmp/errn" || { echo "$name: rank 0 did not report $np processes"; exit 1; }
  [ "$(grep -c 'test ppl' "$tmp/errn")" -eq 1 ] || { echo "$name: not one summary line"; exit 1; }
  $py - "$tmp/$name.one.jsonl" "$tmp/$name.many.jsonl" "$np" "$name" <<'PY'
import json, sys
one = [json.loads(l) for l in open(sys.argv[1])]
many = [json.loads(l) for l in open(sys.argv[2])]
P, name = int(sys.argv[3]), sys.argv[4]
assert len(one) == len(many) == 1, (len(one), len(many))
a, b = one[0], many[0]
assert a["ranks"] == 1 and b["ranks"] == P, (a["ranks"], b["ranks"])
for k in ("params", "params_total", "batch", "steps", "test_tokens"):
    assert a[k] == b[k], (name, k, a[k], b[k])
for k in ("train_ppl", "valid_ppl", "test_ppl"):
    assert abs(a[k] - b[k]) <= 1e-6 * abs(a[k]), (name, k, a[k], b[k])
assert a["alltoall_bytes_per_step"] == 0 and a["allreduce_bytes_per_step"] == 0
assert b["alltoall_bytes_per_step"] > 0 and b["allreduce_bytes_per_step"] > 0
assert b["seconds_compute"] > 0 and b["seconds_alltoall"] >= 0
print("driver_lm_mpi: %s on %d processes = 1 process (perplexities to 1e-6): %.4f"
      % (name, P, b["test_ppl"]))
PY
}

compare topk 3 --quick --gate topk --experts 8 --k 2 --max-tokens 6000 --batch 6 --seed 3
compare switch 2 --quick --gate switch --experts 4 --max-tokens 6000 --batch 5 --seed 3
compare signtree 3 --quick --gate signtree --depth 3 --max-tokens 6000 --batch 5 --seed 3
set -- "$tmp"/*.jsonl*
[ "$#" -eq 6 ] || { echo "more than rank 0's output files"; ls "$tmp"; exit 1; }

for bad in "--quick --batch 2" "--quick --backend cuda"; do
  rc=0
  # shellcheck disable=SC2086
  "$run" 3 "$prog" $bad --out "$tmp/bad.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
  [ "$rc" -ne 0 ] && [ ! -e "$tmp/bad.jsonl" ] ||
    { echo "mpirun -np 3 ccr-lm $bad: exit $rc, want an error and no output"; exit 1; }
  grep -q "processes\|mpirun" "$tmp/err" || { echo "$bad: no reason given"; cat "$tmp/err"; exit 1; }
done
echo "driver_lm_mpi: refusals ok"
