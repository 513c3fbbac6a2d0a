#!/bin/sh
# Proves the gate tests' finite-difference checks bite: for each mutant below,
# recompiles the one library source with -DCCR_MUTANT_<NAME> (the term it
# guards is dropped from the backward), links the gate test program against
# that object and the build's libccr.a, and runs it twice:
#   GATE_FD_REPORT=1    the program must fail (a surviving mutant fails this
#                       script);
#   GATE_FD_REPORT=all  every finite-difference sweep reports its worst
#                       |numeric - analytic| in units of the tolerance
#                       (16 FLT_EPSILON x the tensor's gradient scale,
#                       tests/gate_ref.h) without stopping at the first.
# One line per mutant: sweeps failed / sweeps run, and the smallest and
# largest factor among the failing sweeps (signtree's straight-through
# gradient has no loss to difference; test_gate_signtree checks it against
# its definition, so that mutant reports no sweep).  The build directory is not
# modified (objects and programs go to a temporary directory).
# Usage: tests/gradcheck_mutants.sh BUILD_DIR      (about a minute)
set -eu
build=$(cd "${1:?usage: gradcheck_mutants.sh BUILD_DIR}" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-mutants.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
ninja -C "$build" tests/test_gate_topk tests/test_gate_hmoe tests/test_gate_dense \
  tests/test_gate_switch tests/test_gate_signtree >/dev/null

survived=0
# NAME SOURCE TEST: the mutant, the file it lives in, the program that must catch it
while read -r name src test; do
  [ -n "$name" ] || continue
  cmds="$tmp/cmds"
  (cd "$build" && ninja -t commands "tests/$test") >"$cmds"
  cc_cmd=$(grep -E -- "-c [^ ]*src/$src\$" "$cmds" | tail -1)
  link_cmd=$(tail -1 "$cmds")
  [ -n "$cc_cmd" ] || { echo "no compile command for src/$src"; exit 1; }
  cc_cmd=$(printf '%s\n' "$cc_cmd" | sed -e 's/ -MD / /' -e 's/ -MQ [^ ]*//' -e 's/ -MF [^ ]*//' \
    -e "s| -o [^ ]*| -o $tmp/mutant.o|")
  link_cmd=$(printf '%s\n' "$link_cmd" | sed -e "s| -o tests/$test | -o $tmp/prog $tmp/mutant.o |")
  (cd "$build" && eval "$cc_cmd -Wno-error -DCCR_MUTANT_$name" && eval "$link_cmd")
  rc=0
  (cd "$build" && GATE_FD_REPORT=1 CK_VERBOSITY=silent "$tmp/prog") >"$tmp/out" 2>&1 || rc=$?
  (cd "$build" && GATE_FD_REPORT=all CK_VERBOSITY=silent "$tmp/prog") >"$tmp/all" 2>&1 || true
  # "gate_fd: sweep NAME TAG: worst W x tolerance (...)" for each sweep
  summary=$(sed -n 's/^gate_fd: sweep .*: worst \([^ ]*\) x tolerance.*/\1/p' "$tmp/all" | awk '
    { n++; if ($1 > 1) { f++; if (min == "" || $1 < min) min = $1; if ($1 > max) max = $1 } }
    END { if (f) printf "%d of %d sweeps fail, by %.3g to %.3g x the tolerance", f, n, min, max;
          else if (n) printf "0 of %d sweeps fail", n;
          else printf "(no sweep: caught by the check against the definition)" }')
  if [ "$rc" -eq 0 ]; then
    echo "SURVIVED $name ($src, $test): $summary"
    survived=$((survived + 1))
  else
    echo "caught   $name ($src, $test): $summary"
  fi
done <<'EOF'
TOPK_IMPORTANCE gate_topk.c test_gate_topk
LOAD_THRESHOLD gate_topk_core.c test_gate_topk
LOAD_STD gate_topk_core.c test_gate_topk
NOISE_STD gate_topk_core.c test_gate_topk
TOPK_ZLOSS gate_topk_core.c test_gate_topk
LOAD_THRESHOLD gate_topk_core.c test_gate_hmoe
HMOE_LOADH_PRIMARY gate_hmoe.c test_gate_hmoe
HMOE_LOADH_SECONDARY gate_hmoe.c test_gate_hmoe
HMOE_IMPORTANCE gate_hmoe.c test_gate_hmoe
TOPK_ZLOSS gate_topk_core.c test_gate_hmoe
ROUTER_ZLOSS gate_router.c test_gate_dense
ROUTER_ZLOSS gate_router.c test_gate_switch
SWITCH_AUX gate_switch.c test_gate_switch
SIGNTREE_SIBLING gate_signtree.c test_gate_signtree
EOF
[ "$survived" -eq 0 ] || { echo "$survived mutant(s) survived"; exit 1; }
echo "gradcheck_mutants: every mutant caught"
