#!/bin/sh
# Integration test of ccr-train: a --quick run writes a JSONL record per epoch
# and a safetensors checkpoint; an independent Python reader
# (analysis/safetensors_read.py) loads the checkpoint, and its element count
# must equal the "params" field of the record.  Bad arguments exit 2 and
# leave no output file.  Skips (77) without Debian's python3-numpy or the
# Fashion-MNIST package.
# Usage: driver_train.sh CCR_TRAIN SOURCE_ROOT
set -eu
train=$1
src=$2
py=/usr/bin/python3
data=/usr/share/datasets/fashion-mnist
if ! $py -c 'import numpy' 2>/dev/null; then echo "skip: no python3-numpy"; exit 77; fi
if [ ! -r "$data/train-images-idx3-ubyte.gz" ]; then echo "skip: no $data"; exit 77; fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-train-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$train" --quick --seed 3 --out "$tmp/r.jsonl" --save "$tmp/m.safetensors" 2>"$tmp/err"
$py - "$tmp/r.jsonl" "$tmp/m.safetensors" "$src/analysis" <<'PY'
import json, math, sys
sys.path.insert(0, sys.argv[3])
import safetensors_read as st
recs = [json.loads(l) for l in open(sys.argv[1])]
assert len(recs) == 1, recs
r = recs[0]
for key in ("train_loss", "train_acc", "valid_acc", "test_acc", "test_loss", "params",
            "flops_fwd_per_example", "flops_bwd_per_example", "seconds", "blas_core",
            "machine", "git", "seed"):
    assert key in r, f"missing {key}"
for key in ("train_loss", "test_loss", "test_acc", "seconds"):
    assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
assert r["test_acc"] > 0.7, r["test_acc"]          # one epoch on 6000 examples
tensors, meta = st.read(sys.argv[2])
numel = sum(v.size for v in tensors.values())
assert numel == r["params"], (numel, r["params"])
assert meta["architecture"] == "784;linear:512;relu;linear:256;relu;linear:10", meta
# 784-512-256-10: forward FLOPs = 2 * sum(in*out) + sum(out).
assert r["flops_fwd_per_example"] == 2 * (784*512 + 512*256 + 256*10) + 512 + 256 + 10
print("driver_train: ok", r["test_acc"], numel)
PY

# A residual conditional layer after a linear one (--cond-layers, --residual).
"$train" --quick --seed 3 --hidden 64,64 --cond-layers 2 --residual --gate switch --experts 4 \
  --expert-hidden 16 --out "$tmp/res.jsonl" --save "$tmp/res.safetensors" 2>"$tmp/err"
$py - "$tmp/res.jsonl" "$tmp/res.safetensors" "$src/analysis" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[3])
import safetensors_read as st
r = [json.loads(l) for l in open(sys.argv[1])][-1]
assert r["arch"] == "784-64-switch64+-10" and r["residual"] is True, r
assert r["test_acc"] > 0.6, r["test_acc"]
tensors, meta = st.read(sys.argv[2])
assert sum(v.size for v in tensors.values()) == r["params"]
assert "param.layers.0.w" in tensors and "param.layers.2.gate.w_g" in tensors, sorted(tensors)
# E = 4 experts of 64 -> 16 -> 64, a 64 x 4 router, the linear layers around.
assert r["params"] == (784*64 + 64) + 4 * (64*16 + 16 + 16*64 + 64) + 64*4 + (64*10 + 10), r["params"]
print("driver_train: residual ok", r["test_acc"])
PY

# The sparse optimiser (--optim-sparse, lazy Adam; most of the 256 experts
# skip each batch): recorded, and it learns.
"$train" --quick --seed 3 --hidden 64 --gate topk --experts 256 --k 2 --expert-hidden 16 \
  --optim-sparse --out "$tmp/sp.jsonl" 2>"$tmp/err"
$py - "$tmp/sp.jsonl" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
assert r["optim_sparse"] is True, r
assert r["test_acc"] > 0.2, r["test_acc"]   # learns (chance 0.1); 1 epoch of 256 small experts
print("driver_train: optim-sparse ok", r["test_acc"])
PY

# --quick changes defaults only: an option given before it still applies.
"$train" --max-train 500 --hidden 32 --quick --out "$tmp/q.jsonl" 2>/dev/null
$py - "$tmp/q.jsonl" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])]
assert len(r) == 1 and r[0]["n_train"] == 500 and r[0]["arch"] == "784-32-10", r
PY

# Bad arguments: exit 2, one line on stderr, no output file.
for args in "--gate-width 3" "--batch -4" "--epochs 0" "--act swish" "--data /nonexistent" \
            "--residual" "--gate topk --residual" "--gate topk --hidden 64 --cond-layers 2"; do
  rc=0
  # shellcheck disable=SC2086
  "$train" $args --out "$tmp/bad.jsonl" 2>"$tmp/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "ccr-train $args: exit $rc, want 2"; exit 1; }
  [ ! -e "$tmp/bad.jsonl" ] || { echo "ccr-train $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "ccr-train $args: not one line:"; cat "$tmp/err"; exit 1; }
done
echo "driver_train: bad arguments ok"
