#!/bin/sh
# Every driver rejects option values that are not plain numbers: each bad
# value exits 2 with one line on stderr naming the option.  A sentinel
# option follows the bad value, so a driver that wrongly accepts the value
# stops at the sentinel instead of running (and the test sees which).
# Usage: driver_args.sh DIR_OF_DRIVERS
set -eu
dir=$1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-args-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail=0
n=0

# expect PROG FLAG VALUE: PROG FLAG VALUE --zz-end must exit 2 naming FLAG.
expect() {
  prog=$1 flag=$2 val=$3
  n=$((n + 1))
  rc=0
  "$dir/$prog" "$flag" "$val" --zz-end >"$tmp/out" 2>"$tmp/err" || rc=$?
  if [ "$rc" -ne 2 ] || grep -q -- '--zz-end' "$tmp/err" || ! grep -q -- "$flag" "$tmp/err" ||
     [ "$(wc -l < "$tmp/err")" -ne 1 ]; then
    echo "FAIL: $prog $flag '$val': exit $rc, stderr:"
    cat "$tmp/err"
    fail=$((fail + 1))
  fi
}

sizes="-1|1e3|0x10|12abc|+5| 5|5 | -1|18446744073709551616|1.0"
doubles="nan|inf|-inf| 0.1|0.1x|0x1p-3|1e400|+0.1|1e"
seeds="0|4294967296|-1|1e3| 7"
lists="1,,2|1,|,1|1, 2|1,-2|1,1e3"

# each PROG FLAG "v1|v2|...": expect on every value.
each() {
  old=$IFS
  IFS='|'
  for v in $3; do
    IFS=$old
    expect "$1" "$2" "$v"
    IFS='|'
  done
  IFS=$old
}

each ccr-train --batch "$sizes"
each ccr-train --lr "$doubles"
each ccr-train --seed "$seeds"
each ccr-train --hidden "$lists"
each ccr-train --experts "$sizes"
each ccr-train --noise-eps "$doubles|-0.1"
each ccr-bench-mlp --d-in "$sizes"
each ccr-bench-mlp --seconds "$doubles"
each ccr-bench-mlp --seed "$seeds"
each ccr-bench-mlp --batches "$lists"
each ccr-blas-core --n "$sizes"
each ccr-blas-core --repeat "$sizes"
each ccr-blas-core --cores "$lists"
each ccr-bench-step --experts "$sizes"
each ccr-bench-step --steps "$sizes"
each ccr-probe --batch "$sizes"
each ccr-probe --capacity-factor "$doubles"
each ccr-probe --seed "$seeds"
each ccr-bench --batch "$sizes"
each ccr-bench --d-in "$sizes"
each ccr-bench --hidden "$sizes"
each ccr-bench --d-out "$sizes"
each ccr-bench --threads "$sizes"
each ccr-bench --repeat "$sizes"
each ccr-bench --seed "$seeds"
each ccr-bench --experts "$sizes"
each ccr-capacity --batch "$sizes"
each ccr-capacity --seconds "$doubles"
each ccr-capacity --eval-capacity-factor "$doubles"
each ccr-capacity --grad-mode "x|STE|"
each ccr-capacity --seed "$seeds"
each ccr-capacity --depths "$lists"
each ccr-capacity --gates "topk,|,topk|topk,,hmoe"
each ccr-lm --vocab "$sizes"
each ccr-lm --lr "$doubles"
each ccr-lm --seed "$seeds"
each ccr-lm --split-seed "$seeds"
each ccr-lm --models "moe-4,|,moe-4|moe-4,,moe-32"
each ccr-balance --vocab "$sizes"
each ccr-balance --clip "$doubles"
each ccr-balance --seed "$seeds"
each ccr-balance --settings "$lists"
each ccr-tree --n-train "$sizes"
each ccr-tree --lr "$doubles"
each ccr-tree --seed "$seeds"
each ccr-tree --depths "$lists"
each ccr-tree --models "path,|,leaf|path,,leaf"
each ccr-hier --groups "$sizes"
each ccr-hier --lr "$doubles"
each ccr-hier --seed "$seeds"
each ccr-hier --experts "$lists"
each ccr-hier --noise-eps "$doubles"

echo "driver_args: $((n - fail)) of $n bad values rejected"
[ "$fail" -eq 0 ]
