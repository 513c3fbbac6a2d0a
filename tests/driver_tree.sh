#!/bin/sh
# Integration test of ccr-tree: a --quick run (Fashion-MNIST and the
# synthetic teacher, depths 1 and 3, every model) writes one JSONL record per
# trained model; analysis/check_results.py checks the fields, that the
# numbers are finite, and that the FLOPs counted from the executed routing
# tables equal the analytic ones (evaluation and training mode).  Bad
# arguments exit 2 with one line on stderr and leave no output file.  Skips
# (77) without /usr/bin/python3 or the Fashion-MNIST package.
# Usage: driver_tree.sh CCR_TREE SOURCE_ROOT
set -eu
prog=$1
src=$2
py=/usr/bin/python3
data=/usr/share/datasets/fashion-mnist
if [ ! -x "$py" ]; then echo "skip: no $py"; exit 77; fi
if [ ! -r "$data/train-images-idx3-ubyte.gz" ]; then echo "skip: no $data"; exit 77; fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-tree-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$prog" --quick --seed 2 --out "$tmp/r.jsonl" 2>"$tmp/err" || { cat "$tmp/err"; exit 1; }
# 2 data sets x (linear + 5 models x 2 depths) = 22 records.
$py "$src/analysis/check_results.py" "$tmp/r.jsonl" --min-records 22 \
  --require dataset,model,depth,matched,gate,params,flops_analytic,flops_counted,flops_target,params_target,n_train,n_test,epochs,seconds,train_acc,test_acc \
  --finite params,flops_analytic,flops_counted,flops_train_analytic,flops_train_counted,flops_bwd_analytic,train_loss,train_acc,test_loss,test_acc,seconds \
  --equal flops_counted=flops_analytic,flops_train_counted=flops_train_analytic
$py - "$tmp/r.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
assert len(recs) == 22, len(recs)
seen = {(r["dataset"], r["model"], r["depth"]) for r in recs}
for ds in ("fashion-mnist", "synthetic"):
    assert (ds, "linear", 0) in seen
    for m in ("path", "leaf", "dense-flops", "topk-flops", "dense-params"):
        for d in (1, 3):
            assert (ds, m, d) in seen, (ds, m, d)
for r in recs:
    D, C, d = r["d_in"], r["classes"], r["depth"]
    if r["model"] == "path":
        # ccr's reading: d bits from a projection + (d+1) linear nodes D x C
        assert r["flops_analytic"] == 2*D*d + (d+1)*(2*D*C + 3*C), r
        assert r["params"] == (2**(d+1) - 1)*(D*C + C) + D*d + d, r
        assert r["flops_analytic"] == r["flops_target"]
        assert r["params"] == r["params_target"]
    if r["model"] == "leaf":
        assert r["flops_analytic"] == 2*D*d + 2*D*C + 3*C, r
        assert r["params"] == 2**d*(D*C + C) + D*d + d, r
    if r["model"] == "topk-flops":
        assert r["flops_analytic"] <= r["flops_target"], r
    for k in ("train_acc", "test_acc"):
        assert 0.0 <= r[k] <= 1.0, (k, r[k])
print("driver_tree: ok", len(recs), "records")
PY

# --readings: each tree model once per reading, the hidden readings with a
# trained linear layer of max(d_in, d) units below the tree (its parameters
# counted), the bits' source and gradient mode recorded.
"$prog" --quick --seed 2 --readings frozen,ste,hidden,hidden-ste,hidden-proj --models path,leaf \
  --depths 3 --out "$tmp/rd.jsonl" 2>"$tmp/err" || { cat "$tmp/err"; exit 1; }
$py "$src/analysis/check_results.py" "$tmp/rd.jsonl" --min-records 20 \
  --require reading,bits_width,bits_from,grad_mode --finite train_acc,test_acc,params \
  --equal flops_counted=flops_analytic,flops_train_counted=flops_train_analytic
$py - "$tmp/rd.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
assert len(recs) == 20, len(recs)
want = {"frozen": ("projection", "none", False), "ste": ("projection", "ste", False),
        "hidden": ("input", "none", True), "hidden-ste": ("input", "ste", True),
        "hidden-proj": ("projection", "none", True)}
seen = set()
for r in recs:
    bf, gm, hid = want[r["reading"]]
    assert (r["bits_from"], r["grad_mode"]) == (bf, gm), r
    D, C, d = r["d_in"], r["classes"], r["depth"]
    H = max(D, d)
    assert r["bits_width"] == (H if hid else 0), r
    nodes = 2**(d+1) - 1 if r["model"] == "path" else 2**d
    width = H if hid else D
    proj = width*d + d if bf == "projection" else 0
    assert r["params"] == nodes*(width*C + C) + proj + (D*H + H if hid else 0), r
    seen.add((r["dataset"], r["model"], r["reading"]))
assert len(seen) == 20, seen
print("driver_tree: readings ok")
PY
"$prog" --readings frozen --models linear --out "$tmp/bad.jsonl" 2>"$tmp/err" && exit 1
[ ! -e "$tmp/bad.jsonl" ] || { echo "--readings with no tree model left an output"; exit 1; }

# Bad arguments: exit 2, one line on stderr, no output file.
for args in "--gate signtree" "--depths -1" "--depths 0,40" "--n-train -5" "--epochs 0" \
            "--models path,oak" "--pool 3" "--grad-mode reinforce" "--data /nonexistent" \
            "--datasets mnist" "--n-train 999999" "--readings" "--readings frozen,oak" \
            "--readings frozen --models linear" "--readings ste --grad-mode none"; do
  rc=0
  # shellcheck disable=SC2086
  "$prog" $args --out "$tmp/bad.jsonl" 2>"$tmp/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "ccr-tree $args: exit $rc, want 2"; cat "$tmp/err"; exit 1; }
  [ ! -e "$tmp/bad.jsonl" ] || { echo "ccr-tree $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "ccr-tree $args: not one line:"; cat "$tmp/err"; exit 1; }
done
echo "driver_tree: bad arguments ok"
