#!/bin/sh
# alloc_rule.sh SRCROOT - the allocation rule of docs/DESIGN.md ("Memory"):
# no allocation in src/, cuda/ or experiments/ takes an unchecked product.
# A line that calls anything named *alloc*( (malloc, calloc, realloc,
# ccr_backend_alloc, cudaMalloc, local wrappers) must not contain a binary
# " * " after the call's opening parenthesis.  Compute the size with
# ccr_mul_ok / ccr_mul3_ok / ccr_add_ok first, or call ccr_mallocn,
# ccr_malloc3, ccr_calloc3 or ccr_reallocn (src/internal.h), which check it.
# A product proven small may stay with a comment on the same line:
#   /* bounded: <why it cannot overflow> */
set -u
root=${1:-.}
cd "$root" || exit 2
bad=$(grep -nE '[A-Za-z_]*[Aa]lloc[A-Za-z0-9_]*[[:space:]]*\(' \
          src/*.c src/*/*.c src/*.h cuda/*.cu cuda/*.cuh experiments/*.c experiments/*.h 2>/dev/null |
      grep -v '/\* bounded:' |
      awk '{ line = $0; sub(/^[^:]*:[0-9]+:/, "", line);
             i = match(line, /[A-Za-z_]*[Aa]lloc[A-Za-z0-9_]*[[:space:]]*\(/);
             rest = substr(line, i + RLENGTH);
             if (rest ~ / \* /) print $0 }')
if [ -n "$bad" ]; then
    echo "alloc_rule: unchecked size products in allocations (see docs/DESIGN.md, Memory):"
    echo "$bad"
    exit 1
fi
echo "alloc_rule: ok"
