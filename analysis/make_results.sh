#!/bin/sh
# make_results.sh - regenerates every table and plot of docs/results from
# its JSON Lines files, in one command:
#
#     sh analysis/make_results.sh [RESULTS_DIR]      (default docs/results)
#
# Each FILE.jsonl is recognised by the "driver" field of its first record and
# turned into FILE.table.md (analysis/tables.py) and, where the driver has a
# plot, FILE.png (analysis/plots.py): ccr-capacity -> table + params vs
# time/example plot; ccr-train -> per-epoch table; ccr-bench -> params vs
# time/example per batch (plots.py constwork); ccr-lm -> test perplexity
# vs params and, with several epochs, learning curves (plots.py lmcurve);
# ccr-bench-mlp -> step
# table, with the PyTorch peer bench_mlp_torch_X.jsonl next to bench_mlp_X.
# Files of other drivers are listed and skipped (add a case below).  Then
# every generated block inside the hand-written fragments (*.md, see
# `tables.py refresh`) is rewritten from its JSONL, so the prose around a
# table stays.  Outputs are written to a temporary name and renamed.
# Needs /usr/bin/python3 with python3-matplotlib (PYTHON overrides it).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-/usr/bin/python3}
an=$root/analysis
res=${1:-$root/docs/results}
[ -d "$res" ] || { echo "make_results.sh: no directory $res" >&2; exit 2; }

# table STEM SUBCOMMAND FILE... : STEM.table.md from tables.py
table() {
  stem=$1; shift
  $py "$an/tables.py" "$@" >"$stem.table.md.tmp" && mv "$stem.table.md.tmp" "$stem.table.md"
  echo "make_results.sh: wrote $stem.table.md" >&2
}

for f in "$res"/*.jsonl; do
  [ -e "$f" ] || continue
  case $f in */bench_mlp_torch_*.jsonl) continue ;; esac  # a peer, in its ccr table
  stem=${f%.jsonl}
  driver=$($py -c 'import json, sys
line = open(sys.argv[1]).readline()
print(json.loads(line).get("driver", "") if line.strip() else "")' "$f")
  case $driver in
    ccr-capacity)
      table "$stem" capacity "$f"
      $py "$an/plots.py" capacity "$f" --out "$stem.tmp.png" && mv "$stem.tmp.png" "$stem.png"
      ;;
    ccr-train)
      table "$stem" train "$f"
      ;;
    ccr-bench)
      $py "$an/plots.py" constwork "$f" --out "$stem.tmp.png" && mv "$stem.tmp.png" "$stem.png"
      ;;
    ccr-bench-mlp)
      peer=$(dirname "$f")/$(basename "$f" | sed 's/^bench_mlp_/bench_mlp_torch_/')
      if [ "$peer" != "$f" ] && [ -e "$peer" ]; then table "$stem" bench "$f" "$peer"
      else table "$stem" bench "$f"; fi
      ;;
    ccr-tree)
      for ds in fashion-mnist synthetic; do
        for y in test_acc train_acc; do
          $py "$an/plots.py" xy "$f" --x depth --y $y --group model --where dataset=$ds \
            --title "ccr-tree, $ds: $y vs depth" --out "${stem}_${ds}_${y}.png"
        done
      done
      ;;
    ccr-lm)
      $py "$an/plots.py" xy "$f" --x params --y test_ppl --group model --logx \
        --title "ccr-lm: test perplexity vs parameters" --out "${stem}_ppl_params.png"
      if grep -q '"valid_ppl_epochs":\[[^]]*,' "$f"; then  # several epochs: learning curves
        $py "$an/plots.py" lmcurve "$f" --out "$stem.tmp.png" && mv "$stem.tmp.png" "$stem.png"
      fi
      ;;
    ccr-hier)
      for y in train_cv_load train_max_mean_count; do
        $py "$an/plots.py" xy "$f" --x epoch --y $y --group gate --where experts=64 \
          --title "ccr-hier E=64: $y vs epoch" --out "${stem}_${y}.png"
      done
      ;;
    *)
      echo "make_results.sh: $(basename "$f"): driver '${driver:-none}', no table (skipped)" >&2
      ;;
  esac
done

# Generated blocks inside hand-written fragments and docs/RESULTS.md.
for md in "$res"/*.md "$res/../RESULTS.md"; do
  [ -e "$md" ] || continue
  case $md in *.table.md) continue ;; esac
  $py "$an/tables.py" refresh "$md"
done
