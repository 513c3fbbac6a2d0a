#!/bin/sh
# The PyTorch peers of ccr-bench --peer (analysis/peer_torch.py) compute the
# same layer: for every gate they implement (topk, dense, switch with drops,
# hmoe with a partial and a full primary choice, signtree path and leaf with
# the straight-through gradient and without) and awkward sizes, the
# strong peers' output and dL/dx equal the conventional peer's within 1e-5
# (relative to the largest entry) from the same seed (dL/dx holds the
# straight-through gradient through W_bits, which the strong peer computes
# by hand); a gate they do not implement is reported as unsupported; a bad
# size is a usage error.
# Skips (77) when Debian's python3-torch cannot be imported.
# Usage: peer_check.sh SOURCE_ROOT
set -eu
py=/usr/bin/python3
script=$1/analysis/peer_torch.py
if ! $py -c 'import torch' 2>/dev/null; then echo "skip: no python3-torch"; exit 77; fi
size="--batch 97 --d-in 13 --hidden 19 --d-out 7 --threads 2 --check"
for gate in "topk --experts 7 --k 3" "topk --experts 5 --k 5" "dense --experts 6" \
            "switch --experts 5 --capacity-factor 0.7" "switch --experts 3 --capacity-factor 4" \
            "hmoe --experts 12 --groups 3 --k-groups 2 --k2 2" \
            "hmoe --experts 8 --groups 2 --k-groups 2 --k2 4" \
            "signtree --combine path --depth 3" "signtree --combine leaf --depth 4" \
            "signtree --combine path --depth 2 --grad-mode none" "signtree --combine leaf --depth 0"; do
  # shellcheck disable=SC2086
  out=$($py "$script" --gate $gate $size) || { echo "FAIL: $gate: $out"; exit 1; }
  case $out in *'"check": {'*) echo "ok: $gate: $out" ;; *) echo "FAIL: $gate: $out"; exit 1 ;; esac
done
out=$($py "$script" --gate none $size)
case $out in *'"supported": false'*) ;; *) echo "FAIL: none: $out"; exit 1 ;; esac
if $py "$script" --gate hmoe --experts 10 --groups 3 --check 2>/dev/null; then
  echo "FAIL: groups not dividing experts accepted"; exit 1
fi
echo "all peers agree"
