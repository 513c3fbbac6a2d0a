#!/bin/sh
# api_coverage.sh SRCROOT - every function declared in include/ccr/*.h is
# called in tests/test_api.c, the walk of the NULL-handle rule (ccr.h).
# Declarations are the lines that start a prototype: a return type at the
# start of the line, then ccr_<name>( (static inline helpers excluded).
set -u
root=${1:-.}
cd "$root" || exit 2
names=$(grep -hE '^[A-Za-z_][A-Za-z0-9_ *]*[ *]ccr_[a-z0-9_]+\(' include/ccr/*.h |
        grep -vE '^(static|#|typedef)' |
        sed -E 's/^[^(]*[ *](ccr_[a-z0-9_]+)\(.*/\1/' | sort -u)
count=0
missing=""
for n in $names; do
    count=$((count + 1))
    grep -qE "(^|[^a-z0-9_])$n\(" tests/test_api.c || missing="$missing $n"
done
if [ "$count" -lt 100 ]; then
    echo "api_coverage: found only $count public functions; is the pattern broken?"
    exit 1
fi
if [ -n "$missing" ]; then
    echo "api_coverage: public functions not exercised by tests/test_api.c:$missing"
    exit 1
fi
echo "api_coverage: all $count public functions are called in tests/test_api.c"
