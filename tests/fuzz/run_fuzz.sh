#!/bin/sh
# Runs one libFuzzer target: first every seed input once (a regression run),
# then a time-boxed fuzzing run of CCR_FUZZ_SECONDS seconds (default 30, at
# most 60) under ASan/UBSan with 256 MiB RSS and malloc limits.  New inputs
# go to a temporary directory; the committed seed corpus is never changed.
# A crash, leak, timeout or limit breach fails the test and leaves the input
# under ARTIFACT_DIR (reproduce with: TARGET ARTIFACT_DIR/crash-...).
# Usage: run_fuzz.sh TARGET SEED_DIR ARTIFACT_DIR [DICTIONARY]
set -eu
target=$1
seeds=$2
art=$3
if [ $# -ge 4 ]; then set -- "-dict=$4"; else set --; fi
secs=${CCR_FUZZ_SECONDS:-30}
case $secs in
  ''|*[!0-9]*) echo "CCR_FUZZ_SECONDS must be a number of seconds"; exit 1 ;;
esac
[ "$secs" -le 60 ] || secs=60
mkdir -p "$art"
work=$(mktemp -d "${TMPDIR:-/tmp}/ccr-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
# ASan's default 256 MiB quarantine of freed memory would count against the
# RSS limit by itself; 32 MiB still catches use-after-free of recent blocks.
ASAN_OPTIONS="quarantine_size_mb=32:${ASAN_OPTIONS:-}"
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export ASAN_OPTIONS UBSAN_OPTIONS
limits="-rss_limit_mb=256 -malloc_limit_mb=256 -timeout=10"

n=$(find "$seeds" -type f | wc -l)
[ "$n" -gt 0 ] || { echo "no seed inputs in $seeds"; exit 1; }
echo "== $(basename "$target"): $n seed inputs"
# shellcheck disable=SC2086
find "$seeds" -type f | sort | xargs "$target" $limits -artifact_prefix="$art/" \
  >"$work/seeds.log" 2>&1 || { cat "$work/seeds.log"; exit 1; }

echo "== $(basename "$target"): fuzzing for $secs s"
mkdir "$work/corpus"
# shellcheck disable=SC2086
"$target" $limits "$@" -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$art/" \
  "$work/corpus" "$seeds" >"$work/fuzz.log" 2>&1 || { tail -n 60 "$work/fuzz.log"; exit 1; }
grep -E '^#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|cov:' "$work/fuzz.log" |
  tail -n 4
echo "== $(basename "$target"): ok ($(find "$work/corpus" -type f | wc -l) new inputs)"
