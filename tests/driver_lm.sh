#!/bin/sh
# Integration test of ccr-lm: a --quick run writes one JSONL record per model
# whose fields are present and finite and whose FLOPs counted from the
# executed routing tables equal the analytic count (analysis/check_results.py);
# --accounting-only --paper NAME reproduces every ops/timestep and params
# value of Shazeer et al.'s Tables 7 and 8 within +-0.1 M (values copied here
# from PAPERS.md 2.5, independently of the driver); bad arguments exit 2 with
# one line and leave no output file; --backend cuda trains as on the CPU with
# a GPU and exits 1 cleanly without one.  Skips (77) without the GCIDE corpus.
# Usage: driver_lm.sh CCR_LM SOURCE_ROOT
set -eu
lm=$1
src=$2
py=/usr/bin/python3
corpus=/usr/share/dictd/gcide.dict.dz
if [ ! -r "$corpus" ]; then echo "skip: no $corpus (dict-gcide)"; exit 77; fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-lm-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$lm" --quick --out "$tmp/r.jsonl" 2>"$tmp/err"
grep -q "ETA" "$tmp/err" || { echo "no progress line on stderr"; exit 1; }
$py "$src/analysis/check_results.py" "$tmp/r.jsonl" --min-records 5 \
  --require model,corpus,vocab,d,batch,unroll,params,params_total,ops_per_timestep,flops_per_example,test_ppl,seconds,blas_threads \
  --finite params,params_total,ops_per_timestep,flops_per_example,flops_analytic,flops_counted,train_ppl,valid_ppl,test_ppl,test_nll,seconds,train_seconds,cv_importance,cv_load,grad_norm \
  --equal flops_counted=flops_analytic
$py - "$tmp/r.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
names = [r["model"] for r in recs]
assert names == ["moe-32", "moe-256-h", "moe-1-wide", "moe-1-deep", "4xlstm"], names
for r in recs:
    assert 1.0 < r["test_ppl"] < r["vocab"], (r["model"], r["test_ppl"])
    assert r["params"] < r["params_total"]
    assert r["test_tokens"] == r["n_test"], r
big = {r["model"]: r for r in recs}
assert big["moe-256-h"]["params"] > 5 * big["moe-1-wide"]["params"]
print("driver_lm: quick ok", [(r["model"], round(r["test_ppl"], 1)) for r in recs])
PY

# --quick changes defaults only: options given before or after it still apply.
# With --epochs 2 the record holds both passes' perplexities, the second
# validation figure being the final one (the same model evaluated again).
"$lm" --models moe-4 --max-tokens 4000 --vocab 300 --quick --d 16 --epochs 2 \
  --out "$tmp/q.jsonl" 2>"$tmp/err"
[ "$(grep -c 'epoch [12]/2: train ppl' "$tmp/err")" -eq 2 ] || { echo "no per-epoch lines"; cat "$tmp/err"; exit 1; }
$py - "$tmp/q.jsonl" <<'PY'
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
assert [r["model"] for r in recs] == ["moe-4"], recs
r = recs[0]
assert (r["vocab"], r["d"], r["batch"], r["unroll"], r["epochs"]) == (300, 16, 16, 10, 2), r
assert r["n_train"] + r["n_valid"] + r["n_test"] <= 4000, r
t, v = r["train_ppl_epochs"], r["valid_ppl_epochs"]
assert len(t) == len(v) == 2 and all(math.isfinite(x) and x > 1 for x in t + v), r
assert v[1] == r["valid_ppl"] and t[1] == r["train_ppl"], r   # last pass = the averaged one
assert t[1] < t[0], t
PY
if $py -c 'import matplotlib' 2>/dev/null; then
  $py "$src/analysis/plots.py" lmcurve "$tmp/q.jsonl" --out "$tmp/curve.png" 2>/dev/null
  [ "$(head -c 4 "$tmp/curve.png" | od -An -c | tr -d ' ')" = '211PNG' ] || { echo "plots.py lmcurve: not a PNG"; exit 1; }
fi

# Accounting at paper scale against the printed table values.
$py - "$lm" <<'PY'
import json, subprocess, sys
lm = sys.argv[1]
table = {  # name: (ops M, params excl. embedding & softmax M), Tables 7 and 8
    "moe-4": (8.4, 8.4), "moe-32": (8.4, 37.8), "moe-256": (8.6, 272.9),
    "moe-256-h": (8.4, 272.9), "moe-1024-h": (8.5, 1079.0), "moe-4096-h": (8.9, 4303.4),
    "moe-1024-h-100b": (8.5, 1079.0), "moe-4096-h-100b": (8.6, 4303.4),
    "moe-16384-h-100b": (8.8, 17201.0), "moe-65536-h-100b": (9.2, 68791.0),
    "moe-131072-h-100b": (9.7, 137577.6), "moe-256-h-100b": (8.4, 272.9),
    "4xlstm-512": (8.4, 8.4), "moe-1-wide": (8.4, 8.4), "moe-1-deep": (8.4, 8.4),
    "lstm-2048-512": (9.4, 9.4),
}
for name, (ops, params) in table.items():
    out = subprocess.run([lm, "--accounting-only", "--paper", name], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()
    assert len(out) == 1, out
    r = json.loads(out[0])
    assert r["paper"] == name, r
    assert isinstance(r["params"], int) and isinstance(r["ops_per_timestep"], int), r
    assert abs(r["ops_per_timestep"] / 1e6 - ops) <= 0.1 + 1e-9, (name, r, ops)
    assert abs(r["params"] / 1e6 - params) <= 0.1 + 1e-9, (name, r, params)
    assert abs(r["params_M"] * 1e6 - r["params"]) < 1, r
lst = subprocess.run([lm, "--accounting-only", "--paper", "list"], check=True,
                     capture_output=True, text=True).stdout.strip().splitlines()
listed = {json.loads(l)["paper"] for l in lst}
assert set(table) <= listed, set(table) - listed
own = subprocess.run([lm, "--accounting-only"], check=True, capture_output=True,
                     text=True).stdout.strip().splitlines()
assert len(own) == 8, own
print("driver_lm: accounting ok,", len(table), "models")
PY

# --backend cuda: with a GPU, one record of a run on the device whose test
# perplexity is that of the same run on the CPU within 1% (float rounding
# and expf compound over the steps); without one (or without CUDA in the
# build), exit 1 naming the backend and no output file.
rc=0
small="--quick --gate topk --experts 4 --k 2 --max-tokens 8000"
# shellcheck disable=SC2086
"$lm" $small --backend cuda --out "$tmp/cuda.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
if [ "$rc" -eq 0 ]; then
  # shellcheck disable=SC2086
  "$lm" $small --out "$tmp/cpu.jsonl" >/dev/null 2>&1
  $py - "$tmp/cuda.jsonl" "$tmp/cpu.jsonl" <<'PY'
import json, sys
g, c = (json.loads(open(p).read()) for p in sys.argv[1:3])
assert g["backend"] == "cuda" and c["backend"] == "cpu", (g["backend"], c["backend"])
assert abs(g["test_ppl"] / c["test_ppl"] - 1) < 0.01, (g["test_ppl"], c["test_ppl"])
PY
  echo "driver_lm: --backend cuda ran on the GPU, test perplexity as on the CPU"
else
  [ "$rc" -eq 1 ] && grep -q "backend" "$tmp/err" && [ ! -e "$tmp/cuda.jsonl" ] ||
    { echo "--backend cuda without a GPU: exit $rc, want 1 and no output"; cat "$tmp/err"; exit 1; }
  echo "driver_lm: --backend cuda refused cleanly (no GPU here)"
fi

# Bad arguments: exit 2, one line on stderr, no output file.
for args in "--backend gpu" "--backend" "--gate nosuch" "--batch -4" "--d 0" "--corpus /nonexistent" "--models moe-7" \
            "--paper moe-4" "--dropout 1.5" "--gate topk --experts 4 --k 9" \
            "--accounting-only --paper moe-5"; do
  rc=0
  # shellcheck disable=SC2086
  "$lm" $args --quick --out "$tmp/bad.jsonl" >/dev/null 2>"$tmp/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "ccr-lm $args: exit $rc, want 2"; cat "$tmp/err"; exit 1; }
  [ ! -e "$tmp/bad.jsonl" ] || { echo "ccr-lm $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "ccr-lm $args: not one line:"; cat "$tmp/err"; exit 1; }
done
echo "driver_lm: bad arguments ok"
