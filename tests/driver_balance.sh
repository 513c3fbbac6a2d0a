#!/bin/sh
# Integration test of ccr-balance: a --quick run writes the six Table 6
# settings with finite diagnostics and counted = analytic FLOPs
# (analysis/check_results.py), and the shape of Shazeer's Table 6 holds: with
# no balancing loss CV(Importance) > 1, with any loss it is small; bad
# arguments exit 2 with one line and leave no output file.  Skips (77)
# without the GCIDE corpus.
# Usage: driver_balance.sh CCR_BALANCE SOURCE_ROOT
set -eu
bal=$1
src=$2
py=/usr/bin/python3
corpus=/usr/share/dictd/gcide.dict.dz
if [ ! -r "$corpus" ]; then echo "skip: no $corpus (dict-gcide)"; exit 77; fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-balance-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$bal" --quick --out "$tmp/r.jsonl" 2>"$tmp/err"
grep -q "ETA" "$tmp/err" || { echo "no progress line on stderr"; exit 1; }
$py "$src/analysis/check_results.py" "$tmp/r.jsonl" --min-records 6 \
  --require setting,w_importance,w_load,experts,k,params,flops_per_example,test_ppl,seconds \
  --finite test_ppl,train_ppl,cv_importance,cv_load,cv_load_count,max_mean_load,max_mean_count,params,flops_analytic,flops_counted,seconds \
  --equal flops_counted=flops_analytic
$py - "$tmp/r.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
w = [(r["w_importance"], r["w_load"]) for r in recs]
assert w == [(0, 0), (0.2, 0), (0, 0.2), (0.1, 0.1), (0.01, 0.01), (1, 1)], w
none, rest = recs[0], recs[1:]
assert none["cv_importance"] > 1.0, none["cv_importance"]
for r in rest:
    assert r["cv_importance"] < 0.5 and r["cv_load"] < 0.3, r
    assert r["cv_importance"] < none["cv_importance"] / 3, r
    assert r["max_mean_count"] < none["max_mean_count"], r
print("driver_balance: ok", [(r["setting"], round(r["cv_importance"], 2), round(r["cv_load"], 2)) for r in recs])
PY

for args in "--gate nosuch" "--gate switch" "--experts -3" "--k 40" "--corpus /nonexistent" \
            "--settings 7" "--batch 0"; do
  rc=0
  # shellcheck disable=SC2086
  "$bal" $args --quick --out "$tmp/bad.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "ccr-balance $args: exit $rc, want 2"; cat "$tmp/err"; exit 1; }
  [ ! -e "$tmp/bad.jsonl" ] || { echo "ccr-balance $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "ccr-balance $args: not one line:"; cat "$tmp/err"; exit 1; }
done
echo "driver_balance: bad arguments ok"
