#!/bin/sh
# The example program (experiments/example.c) runs end to end: every gate of
# the registry trained, read and reported; the checkpoint saved and loaded;
# a gate used alone.  Also with the data set absent (synthetic fallback) and
# with bad arguments (exit 2).
# Usage: example.sh CCR_EXAMPLE
set -eu
prog=$1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-example.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$prog" --quick "$tmp" > "$tmp/out"
cat "$tmp/out"
for g in none dense topk hmoe switch signtree; do
  grep -q "^$g .*test acc" "$tmp/out" || { echo "example: no line for gate $g"; exit 1; }
done
[ -s "$tmp/example.safetensors" ] || { echo "example: no checkpoint"; exit 1; }
grep -q "^checkpoint .*saved" "$tmp/out" && grep -q "gate alone" "$tmp/out" ||
  { echo "example: checkpoint or gate-alone step missing"; exit 1; }

"$prog" --quick --steps 3 --data "$tmp/no-such-dir" "$tmp" > "$tmp/out2"
grep -q "synthetic data instead" "$tmp/out2" || { echo "example: no synthetic fallback"; exit 1; }

for args in "" "--steps" "--data" "--steps x $tmp" "--steps -1 $tmp" "--frob $tmp" "$tmp extra"; do
  rc=0
  # shellcheck disable=SC2086
  "$prog" $args >/dev/null 2>&1 || rc=$?
  [ "$rc" -eq 2 ] || { echo "example: '$args' exit $rc, want 2"; exit 1; }
done
echo "example: ok"
