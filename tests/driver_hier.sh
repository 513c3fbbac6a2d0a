#!/bin/sh
# Integration test of ccr-hier: a --quick run (E = 8, flat top-4 vs hmoe
# 2 groups x top-2 x top-2, one epoch on 2000 examples) writes one JSONL
# record per gate and epoch; analysis/check_results.py checks the fields,
# that the numbers are finite, and that the FLOPs counted from the executed
# routing tables equal the analytic ones.  Both gates use 4 experts per
# example of the same size, so their FLOPs differ by the gate only.  Bad
# arguments exit 2 with one line on stderr and leave no output file.  Skips
# (77) without /usr/bin/python3 or the Fashion-MNIST package.
# Usage: driver_hier.sh CCR_HIER SOURCE_ROOT
set -eu
prog=$1
src=$2
py=/usr/bin/python3
data=/usr/share/datasets/fashion-mnist
if [ ! -x "$py" ]; then echo "skip: no $py"; exit 77; fi
if [ ! -r "$data/train-images-idx3-ubyte.gz" ]; then echo "skip: no $data"; exit 77; fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-hier-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$prog" --quick --seed 2 --out "$tmp/r.jsonl" 2>"$tmp/err" || { cat "$tmp/err"; exit 1; }
$py "$src/analysis/check_results.py" "$tmp/r.jsonl" --min-records 2 \
  --require gate,experts,k,k_groups,k2,groups,experts_per_example,epoch,params,flops_analytic,flops_counted,gate_flops,epoch_seconds,test_acc,test_loss \
  --finite params,flops_analytic,flops_counted,flops_train_analytic,flops_train_counted,gate_flops,gate_flops_train,expert_flops,test_loss,test_acc,train_loss,train_cv_importance,train_cv_load,train_cv_load_count,train_max_mean_load,train_max_mean_count,test_cv_importance,test_cv_load_count,test_max_mean_count,epoch_seconds,seconds \
  --equal flops_counted=flops_analytic,flops_train_counted=flops_train_analytic
$py - "$tmp/r.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
assert [r["gate"] for r in recs] == ["topk", "hmoe"], [r["gate"] for r in recs]
flat, hier = recs
assert flat["experts"] == hier["experts"] == 8
assert flat["k"] == hier["k_groups"] * hier["k2"] == flat["experts_per_example"] == hier["experts_per_example"]
assert flat["expert_flops"] == hier["expert_flops"]
d = 784
assert flat["gate_flops"] == 2 * d * 8                                   # x W_g
a, b = hier["groups"], hier["experts"] // hier["groups"]
assert hier["gate_flops"] == 2 * d * a + hier["k_groups"] * 2 * d * b           # primary + k secondary
# Same bank work: the analytic FLOPs differ by the gate FLOPs only.
assert flat["flops_analytic"] - flat["gate_flops"] == hier["flops_analytic"] - hier["gate_flops"]
for r in recs:
    assert 0.0 <= r["test_acc"] <= 1.0
print("driver_hier: ok", [(r["gate"], r["test_acc"]) for r in recs])
PY

# Bad arguments: exit 2, one line on stderr, no output file.
for args in "--gate moe" "--experts -8" "--experts 0" "--k-groups 0" "--k 2" "--groups 3" "--k2 9" \
            "--epochs 0" "--lr -1" "--data /nonexistent" "--max-train 999999"; do
  rc=0
  # shellcheck disable=SC2086
  "$prog" $args --out "$tmp/bad.jsonl" 2>"$tmp/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "ccr-hier $args: exit $rc, want 2"; cat "$tmp/err"; exit 1; }
  [ ! -e "$tmp/bad.jsonl" ] || { echo "ccr-hier $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "ccr-hier $args: not one line:"; cat "$tmp/err"; exit 1; }
done
echo "driver_hier: bad arguments ok"
