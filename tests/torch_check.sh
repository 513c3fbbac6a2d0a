#!/bin/sh
# Cross-check of every gate against an independent PyTorch re-implementation:
# ccr-probe writes one forward/backward pass of a conditional layer per
# configuration, analysis/torch_check.py recomputes each in float64 PyTorch
# (autograd) and compares route, y, aux_loss, exports and every gradient.
# Also checks that ccr-probe rejects bad arguments (exit 2, one line on
# stderr, no file) and that torch_check notices a corrupted file.
# Skips (77) when Debian's python3-torch cannot be imported.
# Usage: torch_check.sh CCR_PROBE SOURCE_ROOT
set -eu
probe=$1
src=$2
py=/usr/bin/python3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-torch-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Bad arguments: exit 2, one line on stderr, no output file.
while IFS= read -r args; do
  [ -n "$args" ] || continue
  rc=0
  # shellcheck disable=SC2086
  "$probe" $args --out "$tmp/bad.st" 2>"$tmp/err" >/dev/null || rc=$?
  [ "$rc" -eq 2 ] || { echo "ccr-probe $args: exit $rc, want 2"; cat "$tmp/err"; exit 1; }
  [ ! -e "$tmp/bad.st" ] || { echo "ccr-probe $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "ccr-probe $args: not one line:"; cat "$tmp/err"; exit 1; }
done <<'EOF'
--gate bogus
--gate
--gate topk --d-in -3
--gate topk --batch 0
--gate topk --experts 4 --k 5
--gate topk --experts 4 --k 0
--gate hmoe --experts 6 --groups 4
--gate hmoe --experts 8 --groups 4 --k-groups 5
--gate switch --capacity-factor 0
--gate switch --eval-capacity-factor -1
--gate signtree --depth 9 --bits-from input --d-in 8
--gate signtree --combine middle
--gate dense --bank sparse
--gate topk --noise-eps -1
--gate topk --w-load x
--gate topk --frobnicate 3
--gate topk stray
--gate topk --residual --d-in 8 --d-out 6
EOF
rc=0
"$probe" --gate topk 2>"$tmp/err" >/dev/null || rc=$?
[ "$rc" -eq 2 ] || { echo "ccr-probe without --out: exit $rc, want 2"; exit 1; }
"$probe" --gate bogus --out "$tmp/bad.st" 2>"$tmp/err" || true
grep -q "none, dense, topk, hmoe, switch, signtree" "$tmp/err" ||
  { echo "unknown gate: valid names not listed:"; cat "$tmp/err"; exit 1; }
rc=0
"$probe" --gate topk --out "$tmp/no/such/dir/x.st" 2>"$tmp/err" || rc=$?
[ "$rc" -eq 2 ] || { echo "ccr-probe --out in a missing directory: exit $rc, want 2"; exit 1; }
"$probe" --help >/dev/null
echo "torch_check: ccr-probe bad arguments ok"

if ! $py -c 'import torch' 2>/dev/null; then echo "skip: no python3-torch"; exit 77; fi

# The configuration matrix: name, then ccr-probe options.
n=0
files=""
while IFS='|' read -r name args; do
  [ -n "$name" ] || continue
  n=$((n + 1))
  # shellcheck disable=SC2086
  if ! "$probe" $args --out "$tmp/$name.st" 2>"$tmp/err"; then
    echo "ccr-probe $args failed:"; cat "$tmp/err"; exit 1
  fi
  files="$files $tmp/$name.st"
done <<'EOF'
none-ffn|--gate none --d-in 7 --d-out 5 --hidden 9 --batch 12 --seed 1
none-linear|--gate none --bank linear --d-in 6 --d-out 4 --batch 8 --seed 2
dense-ffn-z|--gate dense --experts 5 --randomize --z-loss 0.01 --batch 16 --seed 3
dense-linear-zero|--gate dense --bank linear --experts 3 --batch 10 --seed 4
dense-importance|--gate dense --experts 4 --randomize --w-importance 0.7 --batch 12 --seed 35
topk-train|--gate topk --experts 6 --k 2 --train --randomize --batch 24 --seed 5
topk-train-zero-z|--gate topk --experts 5 --k 2 --train --z-loss 0.01 --batch 16 --seed 6
topk-train-k1-linear|--gate topk --experts 4 --k 1 --train --randomize --bank linear --w-importance 0.5 --w-load 0.7 --noise-eps 0.05 --batch 20 --seed 7
topk-train-kE|--gate topk --experts 3 --k 3 --train --randomize --batch 12 --seed 8
topk-eval|--gate topk --experts 6 --k 2 --randomize --z-loss 0.02 --batch 16 --seed 9
topk-eval-zero|--gate topk --experts 4 --k 2 --batch 8 --seed 10
hmoe-train|--gate hmoe --experts 12 --groups 3 --k-groups 2 --k2 2 --train --randomize --z-loss 0.01 --batch 24 --seed 11
hmoe-train-k1|--gate hmoe --experts 6 --groups 3 --k-groups 1 --k2 1 --train --randomize --batch 16 --seed 12
hmoe-train-all|--gate hmoe --experts 6 --groups 2 --k-groups 2 --k2 3 --train --randomize --bank linear --batch 12 --seed 13
hmoe-train-zero|--gate hmoe --experts 8 --groups 2 --k-groups 1 --k2 2 --train --batch 16 --seed 14
hmoe-eval|--gate hmoe --experts 6 --groups 3 --k-groups 2 --k2 1 --randomize --z-loss 0.01 --batch 16 --seed 15
switch-drops|--gate switch --experts 4 --capacity-factor 0.5 --train --randomize --aux-alpha 0.1 --z-loss 0.01 --batch 24 --seed 16
switch-eval-drops|--gate switch --experts 4 --capacity-factor 3 --eval-capacity-factor 0.55 --randomize --batch 20 --seed 32
switch-eval-nolimit|--gate switch --experts 4 --capacity-factor 0.5 --randomize --batch 24 --seed 33
switch-cap-decimal|--gate switch --experts 10 --capacity-factor 1.1 --train --randomize --d-in 12 --batch 100 --seed 34
switch-nodrop|--gate switch --experts 3 --capacity-factor 3 --randomize --batch 12 --seed 17
switch-zero|--gate switch --experts 4 --capacity-factor 1 --bank linear --batch 16 --seed 18
st-path-proj-none|--gate signtree --depth 3 --grad-mode none --randomize --batch 16 --seed 19
st-path-proj-ste|--gate signtree --depth 3 --grad-mode ste --randomize --batch 16 --seed 20
st-path-input-none|--gate signtree --depth 3 --bits-from input --grad-mode none --batch 16 --seed 21
st-path-input-ste|--gate signtree --depth 3 --bits-from input --grad-mode ste --batch 16 --seed 22
st-leaf-proj-none|--gate signtree --depth 3 --combine leaf --grad-mode none --randomize --batch 16 --seed 23
st-leaf-proj-ste|--gate signtree --depth 3 --combine leaf --grad-mode ste --randomize --batch 16 --seed 24
st-leaf-input-none|--gate signtree --depth 2 --combine leaf --bits-from input --grad-mode none --batch 16 --seed 25
st-leaf-input-ste|--gate signtree --depth 3 --combine leaf --bits-from input --grad-mode ste --batch 16 --seed 26
st-path-ffn-ste|--gate signtree --depth 2 --bank ffn --grad-mode ste --randomize --batch 12 --seed 27
st-path-zero-ste|--gate signtree --depth 2 --grad-mode ste --batch 8 --seed 28
switch-drops-residual|--gate switch --experts 4 --capacity-factor 0.5 --train --randomize --residual --d-in 6 --d-out 6 --batch 24 --seed 29
st-path-ste-residual|--gate signtree --depth 2 --grad-mode ste --randomize --residual --d-in 5 --d-out 5 --batch 12 --seed 30
topk-train-residual|--gate topk --experts 5 --k 2 --train --randomize --residual --d-in 7 --d-out 7 --batch 16 --seed 31
EOF

# shellcheck disable=SC2086
if ! $py "$src/analysis/torch_check.py" $files; then
  echo "torch_check: disagreement (see above)"; exit 1
fi
echo "torch_check: $n configurations agree"

# The checker itself must notice a wrong gradient: perturb grad.x of one file.
$py - "$tmp/topk-train.st" "$tmp/corrupt.st" <<'PY'
import json, struct, sys
blob = bytearray(open(sys.argv[1], "rb").read())
(n,) = struct.unpack("<Q", blob[:8])
h = json.loads(blob[8:8 + n])
off = 8 + n + h["grad.x"]["data_offsets"][0]
(v,) = struct.unpack("<f", blob[off:off + 4])
blob[off:off + 4] = struct.pack("<f", v + 1e-2)
open(sys.argv[2], "wb").write(blob)
PY
if $py "$src/analysis/torch_check.py" --quiet "$tmp/corrupt.st" >"$tmp/out" 2>&1; then
  echo "torch_check accepted a corrupted grad.x:"; cat "$tmp/out"; exit 1
fi
echo "torch_check: corrupted file rejected"
