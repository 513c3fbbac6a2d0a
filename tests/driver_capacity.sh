#!/bin/sh
# Integration test of ccr-capacity: a --quick sweep prints a markdown table
# and writes one JSONL record per point; analysis/check_results.py checks the
# fields are present and finite, and an inline reader checks the accounting:
# counted FLOPs equal the analytic figure for every gate except switch, whose
# counted figure is the analytic one less the dropped examples' matrix FLOPs;
# parameters grow with the knob and the per-matrix batch is consistent.
# analysis/tables.py and analysis/plots.py must turn the file into a table and
# a PNG (the plot is skipped without python3-matplotlib).  Bad arguments exit
# 2 with one line on stderr and leave no output file.  Nothing here depends
# on how long anything took.
# Usage: driver_capacity.sh CCR_CAPACITY SOURCE_ROOT
set -eu
cap=$1
src=$2
py=/usr/bin/python3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-capacity-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$cap" --help >"$tmp/help"
grep -q -- "--quick" "$tmp/help" || { echo "--help does not mention --quick"; exit 1; }

"$cap" --quick --seed 5 --out "$tmp/c.jsonl" >"$tmp/table.md" 2>"$tmp/err"
head -1 "$tmp/table.md" | grep -q '^| gate | knob | params |' || { echo "no markdown table"; cat "$tmp/table.md"; exit 1; }
rows=$(grep -c '^| [a-z]' "$tmp/table.md")
[ "$rows" -eq "$(($(wc -l < "$tmp/c.jsonl") + 1))" ] || { echo "table rows $rows != records + header"; exit 1; }
grep -q 'ETA' "$tmp/err" || { echo "no progress line on stderr"; exit 1; }

if ! $py -c 'import json' 2>/dev/null; then echo "skip: no $py"; exit 77; fi
$py "$src/analysis/check_results.py" "$tmp/c.jsonl" --min-records 16 \
  --require series,gate,knob,knob_value,bank,experts,depth,combine,batch,blas_threads,load_avg \
  --finite params,flops_fwd_analytic,flops_fwd_counted,flops_train_fwd_analytic,flops_train_fwd_counted,flops_bwd_analytic,flops_matrix,dropped_per_batch,fwd_seconds_per_example,fwdbwd_seconds_per_example,gate_fwd_seconds_per_example,gate_train_fwd_seconds_per_example,zero_grad_seconds_per_example,params_per_flop,dense_equal_flops_params,params_vs_dense,matrices_used,examples_per_matrix_mean,examples_per_matrix_min,examples_per_matrix_max,matrices_used_train,examples_per_matrix_mean_train,weight_bytes_per_example,seed

$py - "$tmp/c.jsonl" <<'PY'
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
series = {r["series"] for r in recs}
want = {"none", "topk", "hmoe", "switch", "signtree-path", "signtree-leaf"}
assert series == want, series
close = lambda a, b: abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)
for r in recs:
    tag = f"{r['series']} {r['knob']}={r['knob_value']}"
    assert r["seed"] == 5 and r["batch"] == 32, tag
    for mode, drop in (("fwd", "dropped_per_batch"), ("train_fwd", "dropped_per_batch_train")):
        a, c = r[f"flops_{mode}_analytic"], r[f"flops_{mode}_counted"]
        if r["gate"] == "switch":
            want_c = a - r[drop] / r["batch"] * r["flops_matrix"]
            assert close(c, want_c), (tag, mode, a, c, r[drop])
        else:
            assert r[drop] == 0 and close(a, c), (tag, mode, a, c)
    assert r["fwd_seconds_per_example"] > 0 and r["fwdbwd_seconds_per_example"] > 0, tag
    assert 1 <= r["examples_per_matrix_min"] <= r["examples_per_matrix_mean"] <= r["examples_per_matrix_max"] <= r["batch"], tag
    assert 1 <= r["matrices_used"] <= r["n_matrices"], tag
    assert close(r["params_per_flop"], r["params"] / r["flops_fwd_analytic"]), tag
    assert close(r["params_vs_dense"], r["params"] / r["dense_equal_flops_params"]), tag
    # Dense layer at equal FLOPs: about FLOPs / 2 parameters.
    assert 0.45 < r["dense_equal_flops_params"] / r["flops_fwd_analytic"] < 0.55, tag
# Parameters grow with the knob; the tree's node count is exact.
for s in want:
    pts = sorted((r for r in recs if r["series"] == s), key=lambda r: r["knob_value"])
    ps = [r["params"] for r in pts]
    assert ps == sorted(ps) and len(set(ps)) == len(ps), (s, ps)
for r in recs:
    if r["series"] == "signtree-path":
        assert r["n_matrices"] == 2 ** (r["depth"] + 1) - 1 and r["matrices_per_example"] == r["depth"] + 1
    if r["series"] == "signtree-leaf":
        assert r["n_matrices"] == 2 ** r["depth"] and r["matrices_per_example"] == 1
    if r["series"] == "none":
        assert r["matrices_used"] == 1 and r["examples_per_matrix_mean"] == r["batch"]
    if r["series"] in ("topk", "hmoe"):
        assert r["matrices_per_example"] == 4 and r["n_matrices"] == r["experts"], r
print("driver_capacity: records ok", len(recs))
PY

$py "$src/analysis/tables.py" capacity "$tmp/c.jsonl" >"$tmp/t2.md"
[ "$(grep -c '^| ' "$tmp/t2.md")" -eq "$rows" ] || { echo "tables.py capacity: wrong row count"; exit 1; }
printf 'intro\n<!-- tables.py capacity c.jsonl -->\nold\n<!-- end tables.py -->\nafter\n' >"$tmp/frag.md"
$py "$src/analysis/tables.py" refresh "$tmp/frag.md" 2>/dev/null
! grep -q '^old$' "$tmp/frag.md" && grep -q '^after$' "$tmp/frag.md" && grep -q '^| topk | E=16 |' "$tmp/frag.md" \
  || { echo "tables.py refresh failed"; cat "$tmp/frag.md"; exit 1; }
if $py -c 'import matplotlib' 2>/dev/null; then
  $py "$src/analysis/plots.py" capacity "$tmp/c.jsonl" --out "$tmp/c.png" 2>/dev/null
  $py "$src/analysis/plots.py" xy "$tmp/c.jsonl" --x params --y fwd_gflops --group series --logx --out "$tmp/xy.png" 2>/dev/null
  for f in c.png xy.png; do
    [ "$(head -c 4 "$tmp/$f" | od -An -c | tr -d ' ')" = '211PNG' ] || { echo "plots.py: $f is not a PNG"; exit 1; }
  done
else
  echo "note: no python3-matplotlib, plots not checked"
fi
echo "driver_capacity: tables and plots ok"

# Bad arguments: exit 2, one line on stderr, no output file.
for args in "--gates topk,bogus" "--batch -4" "--experts 4,0" "--depths -1" "--d 0" \
            "--k 5 --experts 4" "--k2 3" "--seconds x" "--bogus 1" "--gates" "--max-gib -1" \
            "--backend gpu" "--backend"; do
  rc=0
  # shellcheck disable=SC2086
  "$cap" --quick $args --out "$tmp/bad.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "ccr-capacity $args: exit $rc, want 2"; cat "$tmp/err"; exit 1; }
  [ ! -e "$tmp/bad.jsonl" ] || { echo "ccr-capacity $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "ccr-capacity $args: not one line:"; cat "$tmp/err"; exit 1; }
done
echo "driver_capacity: bad arguments ok"

# --backend cuda: with a GPU, records without the CPU-only gate timings;
# without one, exit 1 naming the backend and no output file.
rc=0
"$cap" --quick --gates topk,signtree-path --backend cuda --out "$tmp/cuda.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
if [ "$rc" -eq 0 ]; then
  [ "$(wc -l < "$tmp/cuda.jsonl")" -eq 6 ] || { echo "--backend cuda: not 6 records"; exit 1; }
  ! grep -q '"gate_fwd_seconds_per_example"' "$tmp/cuda.jsonl" ||
    { echo "--backend cuda: a CPU-only gate timing in the records"; exit 1; }
  echo "driver_capacity: --backend cuda ran on the GPU"
else
  [ "$rc" -eq 1 ] && grep -q "backend" "$tmp/err" && [ ! -e "$tmp/cuda.jsonl" ] ||
    { echo "--backend cuda without a GPU: exit $rc, want 1 and no output"; cat "$tmp/err"; exit 1; }
  echo "driver_capacity: --backend cuda refused cleanly (no GPU here)"
fi
