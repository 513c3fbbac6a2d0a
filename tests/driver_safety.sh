#!/bin/sh
# Results and checkpoints are never lost (issue 9): the drivers refuse, with
# exit 2 and before any work, an output that is an input (--out naming the
# corpus or a Fashion-MNIST file) or another output (--out == --save), and an
# output directory that cannot be written; a killed run keeps the previous
# --out and leaves its lines in <out>.partial; the next run keeps a dead
# process's results temporary as <out>.partial and removes its other ones;
# a device as --out (/dev/null) is written in place, never replaced; a run
# that fails (a full disk) exits 1 with the same guarantees.
# Usage: driver_safety.sh CCR_TRAIN CCR_LM CCR_CAPACITY
set -eu
train=$1
lm=$2
cap=$3
data=/usr/share/datasets/fashion-mnist
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-safety-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail() { echo "driver_safety: $*" >&2; exit 1; }

# Runs "$@", expects exit status $want; stderr in $tmp/err.
expect_rc() {
  want=$1; shift
  rc=0
  "$@" >/dev/null 2>"$tmp/err" || rc=$?
  [ "$rc" -eq "$want" ] || { cat "$tmp/err" >&2; fail "exit $rc, want $want: $*"; }
}

# 1. --out naming an input: refused, the input untouched.
corpus=/usr/share/dictd/gcide.dict.dz
if [ -r "$corpus" ]; then
  cp "$corpus" "$tmp/corpus.dz"
  cp "$corpus" "$tmp/corpus.orig"
  lmargs="--quick --models moe-4 --max-tokens 4000 --vocab 300 --d 16 --corpus $tmp/corpus.dz"
  expect_rc 2 "$lm" $lmargs --out "$tmp/corpus.dz"
  grep -q 'same file as the input --corpus' "$tmp/err" || fail "no message: $(cat "$tmp/err")"
  cmp -s "$tmp/corpus.dz" "$tmp/corpus.orig" || fail "--corpus was overwritten"
  ln "$tmp/corpus.dz" "$tmp/hardlink"   # another name, same inode
  expect_rc 2 "$lm" $lmargs --out "$tmp/hardlink"
  cmp -s "$tmp/corpus.dz" "$tmp/corpus.orig" || fail "--corpus was overwritten through a link"
  rm "$tmp/corpus.dz" "$tmp/corpus.orig" "$tmp/hardlink"
else
  echo "driver_safety: no $corpus, skipping the ccr-lm cases"
fi

have_data=0
[ -r "$data/train-images-idx3-ubyte.gz" ] && have_data=1
if [ $have_data = 1 ]; then
  mkdir "$tmp/data"
  cp "$data"/*-ubyte* "$tmp/data/"
  cp "$tmp/data/t10k-labels-idx1-ubyte.gz" "$tmp/labels.orig"
  expect_rc 2 "$train" --quick --data "$tmp/data" --out "$tmp/data/t10k-labels-idx1-ubyte.gz"
  grep -q 'same file as the input --data' "$tmp/err" || fail "no message: $(cat "$tmp/err")"
  cmp -s "$tmp/data/t10k-labels-idx1-ubyte.gz" "$tmp/labels.orig" || fail "--data file overwritten"

  # 2. --out and --save the same file (spelled differently): refused.
  expect_rc 2 "$train" --quick --data "$tmp/data" --out "$tmp/x" --save "$tmp/./x"
  grep -q 'are the same file' "$tmp/err" || fail "no message: $(cat "$tmp/err")"
  [ ! -e "$tmp/x" ] || fail "--out/--save conflict left a file"
  echo '{"old":1}' >"$tmp/y"
  expect_rc 2 "$train" --quick --data "$tmp/data" --out "$tmp/y" --save "$tmp/y"
  [ "$(cat "$tmp/y")" = '{"old":1}' ] || fail "--out/--save conflict changed the file"

  # 3. An unwritable --save directory: refused before training (no --out).
  for save in "$tmp/nodir/m.safetensors" /proc/ccr-safety-test.safetensors; do
    expect_rc 2 "$train" --quick --data "$tmp/data" --out "$tmp/r3.jsonl" --save "$save"
    grep -q -- "--save $save" "$tmp/err" || fail "no message: $(cat "$tmp/err")"
    [ ! -e "$tmp/r3.jsonl" ] || fail "training ran before the --save check"
  done
  if [ "$(id -u)" != 0 ]; then   # root writes through permission bits
    mkdir "$tmp/ro"; chmod 555 "$tmp/ro"
    expect_rc 2 "$train" --quick --data "$tmp/data" --out "$tmp/r3.jsonl" --save "$tmp/ro/m.st"
    grep -q 'not writable' "$tmp/err" || fail "no message: $(cat "$tmp/err")"
    chmod 755 "$tmp/ro"
  fi
else
  echo "driver_safety: no $data, skipping the ccr-train cases"
fi
expect_rc 2 "$cap" --quick --gates none --dense-hidden 4 --out "$tmp/nodir/c.jsonl"
expect_rc 2 "$cap" --quick --gates none --dense-hidden 4 --out "$tmp"

# 4. A killed run: the previous --out untouched, its lines in .partial, no
# temporary left.  The kill comes once the first line is in the temporary
# (the run has 27 points of 1 s each, so it is still going).
echo '{"old":1}' >"$tmp/res.jsonl"
hs=$(seq -s, 4 30)
"$cap" --quick --gates none --dense-hidden "$hs" --seconds 1 --out "$tmp/res.jsonl" \
  >/dev/null 2>"$tmp/err4" &
pid=$!
i=0
while :; do
  f=$(ls "$tmp"/res.jsonl.ccr-tmp.* 2>/dev/null | head -n 1)
  [ -n "$f" ] && [ -s "$f" ] && break
  kill -0 $pid 2>/dev/null || { cat "$tmp/err4" >&2; fail "the run to kill ended early"; }
  i=$((i + 1))
  [ $i -lt 1200 ] || { kill $pid; fail "no line after 120 s"; }
  sleep 0.1
done
kill -TERM $pid
rc=0; wait $pid || rc=$?
[ $rc -ne 0 ] || fail "killed run exited 0"
[ "$(cat "$tmp/res.jsonl")" = '{"old":1}' ] || fail "killed run changed --out"
[ -s "$tmp/res.jsonl.partial" ] || fail "killed run left no .partial"
grep -q 'res.jsonl.partial' "$tmp/err4" || fail "no message: $(cat "$tmp/err4")"
[ "$(tail -c 1 "$tmp/res.jsonl.partial" | od -An -c | tr -d ' ')" = '\n' ] ||
  fail ".partial ends in half a line"
ls "$tmp" | grep -q 'ccr-tmp' && fail "killed run left a temporary: $(ls "$tmp")"

# 4b. A run that fails (the disk fills up: a file size limit, SIGXFSZ
# ignored so writes get EFBIG) exits 1, keeps --out, and its .partial holds
# only full lines.
echo '{"old":1}' >"$tmp/full.jsonl"
rc=0
(trap '' XFSZ; ulimit -f 4; exec "$cap" --quick --gates none --dense-hidden "$hs" --seconds 0 \
  --out "$tmp/full.jsonl") >/dev/null 2>"$tmp/err" || rc=$?
[ $rc -eq 1 ] || { cat "$tmp/err" >&2; fail "full disk: exit $rc, want 1"; }
[ "$(cat "$tmp/full.jsonl")" = '{"old":1}' ] || fail "full disk changed --out"
[ -s "$tmp/full.jsonl.partial" ] || fail "full disk left no .partial"
[ "$(tail -c 1 "$tmp/full.jsonl.partial" | od -An -c | tr -d ' ')" = '\n' ] ||
  fail "full disk: .partial ends in half a line"
ls "$tmp" | grep -q 'ccr-tmp' && fail "failed run left a temporary: $(ls "$tmp")"

# 5. Stale temporaries of dead processes (a SIGKILLed run) are cleared at the
# next run: a results temporary's complete lines are kept in <out>.partial,
# a checkpoint's temporary is removed; a live process's temporary stays.
dead=$(sh -c 'echo $$')
printf '{"a":1}\n{"b":2}\n{"c":' >"$tmp/lost.jsonl.ccr-tmp.$dead.0"
printf '\173\0\0\0\0\0\0\0{"x"' >"$tmp/m.safetensors.ccr-tmp.$dead.1"
echo x >"$tmp/m.safetensors.ccr-tmp.$$.0"
"$cap" --quick --gates none --dense-hidden 4 --out "$tmp/res.jsonl" >/dev/null 2>"$tmp/err"
[ ! -e "$tmp/lost.jsonl.ccr-tmp.$dead.0" ] || fail "stale results temporary left"
[ "$(cat "$tmp/lost.jsonl.partial")" = "$(printf '{"a":1}\n{"b":2}')" ] ||
  fail "stale results not kept in .partial: $(cat "$tmp/lost.jsonl.partial" 2>&1)"
grep -q 'lost.jsonl.partial' "$tmp/err" || fail "no message for kept results: $(cat "$tmp/err")"
[ ! -e "$tmp/m.safetensors.ccr-tmp.$dead.1" ] || fail "stale checkpoint temporary not removed"
[ -e "$tmp/m.safetensors.ccr-tmp.$$.0" ] || fail "a live process's temporary was removed"
grep -q 'removed 1 stale temporary' "$tmp/err" || fail "no message: $(cat "$tmp/err")"
[ "$(wc -l <"$tmp/res.jsonl")" -eq 1 ] || fail "the run did not replace --out"

# 6. A device is written in place, never renamed over.
expect_rc 0 "$cap" --quick --gates none --dense-hidden 4 --seconds 0 --out /dev/null
[ -c /dev/null ] || fail "/dev/null is no longer a device"
echo "driver_safety: ok"
