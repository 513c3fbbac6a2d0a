#!/bin/sh
# Gate options in the drivers (issue 9, classes 5-6): an option given
# explicitly that the chosen gate does not use is a usage error (exit 2,
# one line naming the flag, no output file); hmoe's groups per example is
# --k-groups (topk's --k counts experts); an unknown gate is named with the
# valid ones; and a gate chosen by name alone gets the library's defaults
# (ccr-probe's metadata: the bank, the sizes).
# Usage: driver_gate_options.sh CCR_PROBE CCR_TRAIN CCR_LM
set -eu
probe=$1
train=$2
lm=$3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-gate-options.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# "driver|args|flag the message must name"
while IFS='|' read -r drv args flag; do
  [ -n "$drv" ] || continue
  case $drv in
    probe) prog=$probe; extra="--out $tmp/bad.out" ;;
    train) prog=$train; extra="--quick --out $tmp/bad.out" ;;
    lm) prog=$lm; extra="--quick --out $tmp/bad.out" ;;
  esac
  rc=0
  # shellcheck disable=SC2086
  "$prog" $args $extra >/dev/null 2>"$tmp/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "$drv $args: exit $rc, want 2"; cat "$tmp/err"; exit 1; }
  [ ! -e "$tmp/bad.out" ] || { echo "$drv $args left an output file"; exit 1; }
  [ "$(wc -l < "$tmp/err")" -eq 1 ] || { echo "$drv $args: not one line:"; cat "$tmp/err"; exit 1; }
  grep -q -- "$flag" "$tmp/err" || { echo "$drv $args: message does not name $flag:"; cat "$tmp/err"; exit 1; }
done <<'CASES'
probe|--gate topk --depth 3|--depth
probe|--gate none --experts 4|--experts
probe|--gate none --randomize|--randomize
probe|--gate hmoe --experts 8 --k 2|--k
probe|--gate topk --k-groups 2|--k-groups
probe|--gate dense --w-load 0.5|--w-load
probe|--gate switch --w-importance 0.5|--w-importance
probe|--gate topk --eval-capacity-factor 1|--eval-capacity-factor
probe|--gate signtree --noise-eps 0.1|--noise-eps
probe|--gate signtree --expert-hidden 8|--expert-hidden
probe|--gate sparse|sparse
train|--gate switch --depth 2|--depth
train|--gate hmoe --k 1|--k
train|--experts 4|--experts
lm|--gate topk --aux-alpha 0.1|--aux-alpha
lm|--gate nosuch|nosuch
lm|--experts 16|--experts
lm|--k 3|--k
lm|--capacity-factor 2|--capacity-factor
lm|--bank linear|--bank
CASES
"$probe" --gate sparse --out "$tmp/bad.out" 2>"$tmp/err" || true
grep -q "none, dense, topk, hmoe, switch, signtree" "$tmp/err" ||
  { echo "unknown gate: valid names not listed:"; cat "$tmp/err"; exit 1; }
echo "driver_gate_options: unused options refused"

# Options a gate uses are accepted, hmoe's --k-groups among them, and
# --gate NAME alone gives the library's defaults: E 8, k 2, groups 2,
# k_groups 2, k2 2, depth 4, bank linear for signtree and FFN otherwise.
"$probe" --gate hmoe --experts 8 --groups 4 --k-groups 3 --k2 2 --out "$tmp/h.st" 2>"$tmp/err" ||
  { cat "$tmp/err"; exit 1; }
"$probe" --gate dense --w-importance 0.5 --out "$tmp/d.st" 2>"$tmp/err" || { cat "$tmp/err"; exit 1; }
"$probe" --gate switch --eval-capacity-factor 1.5 --out "$tmp/s.st" 2>"$tmp/err" ||
  { cat "$tmp/err"; exit 1; }
for g in none dense topk hmoe switch signtree; do
  "$probe" --gate $g --out "$tmp/$g.st" 2>"$tmp/err" || { cat "$tmp/err"; exit 1; }
done
/usr/bin/python3 - "$tmp" <<'PY'
import json, struct, sys
tmp = sys.argv[1]
def meta(name):
    blob = open(f"{tmp}/{name}.st", "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n])["__metadata__"]
h = meta("h")
assert h["k_groups"] == "3" and int(h["slots"]) == 3 * 2, h
for g in ["none", "dense", "topk", "hmoe", "switch", "signtree"]:
    m = meta(g)
    assert m["bank"] == ("linear" if g == "signtree" else "ffn"), (g, m["bank"])
    assert (m["experts"], m["k"], m["groups"], m["k_groups"], m["k2"], m["depth"]) == \
        ("8", "2", "2", "2", "2", "4"), (g, m)
    assert m["eval_capacity_factor"] == "0" and m["capacity_factor"] == "1.25", (g, m)
assert meta("none")["n_matrices"] == "1" and meta("signtree")["n_matrices"] == "31"
assert meta("s")["eval_capacity_factor"] == "1.5"
print("driver_gate_options: defaults and used options ok")
PY
