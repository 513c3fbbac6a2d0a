#!/bin/sh
# Sizes the machine cannot hold (issue 9, class 1): a huge --batch or
# --hidden makes ccr-train and ccr-tree stop before training with exit 1
# (a runtime failure, docs/DESIGN.md) and a message saying how much memory
# the request needs; it used to wrap max_batch x width and write past a heap
# buffer.  ccr-tree runs on its synthetic data only (no data set needed);
# ccr-train needs Fashion-MNIST and is skipped without it.  Also: a run whose
# loss becomes non-finite stops with exit 1 and a message (class 3).
# ccr-lm and ccr-balance (their language model's buffers) run when their
# corpus is installed.
# Usage: driver_limits.sh CCR_TRAIN CCR_TREE CCR_LM CCR_BALANCE
set -u
train=$1
tree=$2
lm=$3
balance=$4
data=/usr/share/datasets/fashion-mnist
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-limits-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail=0

# expect_too_big NAME CMD...: exit 1 and "needs ... this machine has" on stderr.
expect_too_big() {
    name=$1
    shift
    "$@" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if [ "$rc" -ne 1 ] || ! grep -q 'needs .*this machine has' "$tmp/err"; then
        echo "FAIL $name: exit $rc (want 1 with 'needs ... this machine has'):"
        cat "$tmp/err"
        fail=1
    else
        echo "ok $name: $(tail -n 1 "$tmp/err")"
    fi
}

wrap=4611686018427387920  # 2^62 + 16: the activation block's size wraps to a
                          # small number (the old code segfaulted)
big=100000000000000000    # 1e17: max_batch x d_in x 4 overflows size_t
huge=10000000000          # 1e10: no wrap, far more than any machine
for b in $wrap $big $huge; do
    expect_too_big "ccr-tree --batch $b" \
        "$tree" --quick --datasets synthetic --batch "$b" --out "$tmp/t.jsonl"
done
if [ -r "$data/train-images-idx3-ubyte.gz" ]; then
    expect_too_big "ccr-train --batch $wrap" \
        "$train" --quick --max-train 1000 --valid 100 --batch "$wrap" --out "$tmp/r.jsonl"
    expect_too_big "ccr-train --hidden 2^33,2^33" \
        "$train" --quick --max-train 1000 --valid 100 --hidden 8589934592,8589934592 \
        --out "$tmp/r.jsonl"
    # Class 3: a diverging run (SGD at lr 100) stops at the first non-finite
    # loss with exit 1 and says so; it used to finish with NaN results, exit 0.
    # With --save, the parameters of the last update are kept in
    # <save>.partial, and --save itself is not written.
    "$train" --quick --max-train 1000 --valid 100 --optim sgd --momentum 0.99 --lr 100 \
        --out "$tmp/nf.jsonl" --save "$tmp/nf.st" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if [ -e "$tmp/nf.st" ] || [ ! -s "$tmp/nf.st.partial" ] ||
       ! grep -q 'parameters of the last update' "$tmp/err"; then
        echo "FAIL ccr-train diverging: no checkpoint in nf.st.partial, or --save written:"
        cat "$tmp/err"
        fail=1
    fi
    if [ "$rc" -ne 1 ] || ! grep -q 'non-finite' "$tmp/err"; then
        echo "FAIL ccr-train diverging: exit $rc (want 1 with 'non-finite'):"
        cat "$tmp/err"
        fail=1
    else
        echo "ok ccr-train diverging: $(tail -n 1 "$tmp/err")"
    fi
    # Exit codes (docs/DESIGN.md): a data set that cannot be loaded for lack
    # of memory is a runtime failure (exit 1, "out of memory"), a missing
    # one a usage error (exit 2); both used to exit 2.  The memory is capped
    # with ulimit -v (150 MB: the process starts, the 188 MB of training
    # images do not fit); skipped where the cap stops the process earlier
    # (a sanitizer build) or does not bite.
    (ulimit -v 150000 && OPENBLAS_NUM_THREADS=1 exec "$train" --quick --out "$tmp/m.jsonl") \
        >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if ! grep -q 'cannot load.*cannot allocate' "$tmp/err"; then
        echo "skip ccr-train load out of memory: exit $rc, $(tail -n 1 "$tmp/err")"
    elif [ "$rc" -ne 1 ] || ! grep -q 'out of memory' "$tmp/err"; then
        echo "FAIL ccr-train load out of memory: exit $rc (want 1 with 'out of memory'):"
        cat "$tmp/err"
        fail=1
    else
        echo "ok ccr-train load out of memory: exit 1"
    fi
    "$train" --quick --data "$tmp/no-such-dir" --out "$tmp/m.jsonl" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if [ "$rc" -ne 2 ]; then
        echo "FAIL ccr-train missing data: exit $rc (want 2):"
        cat "$tmp/err"
        fail=1
    else
        echo "ok ccr-train missing data: exit 2"
    fi
else
    echo "skip ccr-train cases: no $data"
fi
for p in "$lm" "$balance"; do
    "$p" --help >"$tmp/help" 2>&1
    corpus=$(sed -n 's/.*--corpus.*\[\(.*\)\].*/\1/p' "$tmp/help" | head -n 1)
    if [ -n "$corpus" ] && [ -r "$corpus" ]; then
        expect_too_big "$(basename "$p") --batch $big" \
            "$p" --quick --batch "$big" --out "$tmp/l.jsonl"
    else
        echo "skip $(basename "$p"): no corpus '$corpus'"
    fi
done
exit $fail
