#!/bin/sh
# analysis/ep_cost.py on the committed P = 1, 2, 4 records: the validation
# table has a row per measured P, the extrapolation one a row per P = 8 ..
# 4096, and the prediction for the P = 1 run is the measurement itself (the
# compute constant comes from it).  Skipped without python3.
# Usage: ep_cost.sh SOURCE_ROOT
set -eu
src=$1
py=/usr/bin/python3
if [ ! -x "$py" ]; then echo "skip: no $py"; exit 77; fi
out=$("$py" "$src/analysis/ep_cost.py" "$src"/docs/results/ep_train_np1.jsonl \
      "$src"/docs/results/ep_train_np2.jsonl "$src"/docs/results/ep_train_np4.jsonl)
for p in 1 2 4 8 16 64 256 1024 4096; do
  echo "$out" | grep -q "^| $p |" || { echo "ep_cost: no row for P = $p"; echo "$out"; exit 1; }
done
echo "$out" | grep -q "^| 1 | [0-9.]* | [0-9.]* | +0% |" || { echo "ep_cost: P = 1 not exact"; exit 1; }
echo "ep_cost: tables ok"
