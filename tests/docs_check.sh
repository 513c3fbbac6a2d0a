#!/bin/sh
# docs_check.sh SRCDIR - the documentation stays inside the repository:
#  1. every relative Markdown link or image in docs/ and README.md resolves
#     to an existing file inside the repository;
#  2. no file in docs/ refers to a path that leaves the repository
#     ("../" climbing above the root, or the out-of-tree "shared/docs/");
#  3. the installed headers (include/ccr/*.h) do not point into src/: no
#     "src/" path and no name of a file that lives in src/.
set -u
root=$(cd "${1:?usage: docs_check.sh SRCDIR}" && pwd -P)
fail=0
bad() { echo "docs_check: $*" >&2; fail=1; }

for f in "$root"/README.md "$root"/docs/*.md "$root"/docs/results/*.md; do
    [ -f "$f" ] || continue
    dir=$(dirname "$f")
    rel=${f#"$root"/}
    # 1. Markdown link targets: ](target) or ](target "title").
    grep -o '](\([^)]*\))' "$f" | sed 's/^](//; s/)$//; s/ .*//; s/#.*//' |
    while IFS= read -r t; do
        case "$t" in
            ''|http://*|https://*|mailto:*) continue ;;
        esac
        case "$t" in
            /*) p=$t ;;
            *) p=$dir/$t ;;
        esac
        real=$(realpath -m "$p")
        case "$real" in
            "$root"/*) [ -e "$real" ] || { echo "docs_check: $rel: link to missing $t" >&2; echo x; } ;;
            *) echo "docs_check: $rel: link leaves the repository: $t" >&2; echo x ;;
        esac
    done | grep -q x && fail=1
    # 2. Paths in the text that climb out of the repository.
    if grep -n 'shared/docs/' "$f" >/dev/null; then
        bad "$rel: refers to the out-of-tree shared/docs/: $(grep -n 'shared/docs/' "$f" | head -3)"
    fi
    for t in $(grep -o '\(\.\./\)\+[A-Za-z0-9_./-]*' "$f" | sort -u); do
        real=$(realpath -m "$dir/$t")
        case "$real" in
            "$root"|"$root"/*) ;;
            *) bad "$rel: path leaves the repository: $t" ;;
        esac
    done
done

# 3. Installed headers must not point into src/.
names=$(mktemp)
trap 'rm -f "$names"' EXIT
for s in "$root"/src/*.c "$root"/src/*.h; do basename "$s"; done > "$names"
hits=$(grep -n 'src/' "$root"/include/ccr/*.h; grep -n -w -F -f "$names" "$root"/include/ccr/*.h)
[ -z "$hits" ] || bad "installed headers point into src/:
$hits"

[ "$fail" -eq 0 ] && echo "docs_check: ok"
exit "$fail"
