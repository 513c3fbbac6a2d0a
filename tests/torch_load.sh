#!/bin/sh
# Round trip between ccr's checkpoints and plain PyTorch
# (analysis/ccr_torch_load.py; Debian's torch 1.13 has no safetensors module):
#   1. st_roundtrip writes three checkpoints (an MLP and nets with a topk and
#      a signtree conditional layer) and every value as text;
#   2. ccr_torch_load.load gives torch tensors equal to those values, bit for
#      bit; parse_architecture reads each architecture string (the cond
#      layers' options and bank size; malformed and pre-issue-9 strings are
#      refused); the MLP rebuilt with to_torch_module reproduces ccr's
#      forward output;
#   3. PyTorch doubles every MLP parameter and writes mlp2.safetensors with
#      ccr_torch_load.save; ccr_net_load reads it back (st_roundtrip read);
#   4. the comparison is live: a changed value is reported.
# Skips (77) when Debian's python3-torch cannot be imported.
# Usage: torch_load.sh ST_ROUNDTRIP SOURCE_ROOT
set -eu
prog=$1
src=$2
py=/usr/bin/python3
if ! $py -c 'import torch' 2>/dev/null; then echo "skip: no python3-torch"; exit 77; fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ccr-torch-load.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$prog" write "$tmp"

check() {
  $py - "$src/analysis" "$tmp" "$1" <<'PY'
import sys
import torch
sys.path.insert(0, sys.argv[1])
import ccr_torch_load as ctl
d, values = sys.argv[2], sys.argv[3]
want = {}
for line in open(values):
    f = line.split()
    want[(f[0], f[1])] = torch.tensor([float(v) for v in f[3:]], dtype=torch.float32)
    assert len(f) - 3 == int(f[2])
bad = 0
for file in ("mlp", "cond", "tree"):
    state, meta = ctl.load(f"{d}/{file}.safetensors")
    assert meta["format"] == "ccr.net", meta
    arch = ctl.parse_architecture(meta["architecture"])
    names = [k for (fl, k) in want if fl == file and k not in ("x", "y")]
    if list(state) != names:
        print(f"{file}: tensors {list(state)} != {names}"); bad += 1
    for k in names:
        got = state[k].reshape(-1)
        if not torch.equal(got, want[(file, k)]):
            i = int((got != want[(file, k)]).nonzero()[0])
            print(f"{file}: {k}[{i}] = {got[i].item()!r}, want {want[(file, k)][i].item()!r}")
            bad += 1
    print(f"{file}: {meta['architecture']}: {len(state)} tensors")
    if file == "tree":
        c = arch[-1]
        assert [l["kind"] for l in arch] == ["input", "linear", "relu", "cond"], arch
        assert c == {"kind": "cond", "gate": "signtree", "d_out": 3, "depth": 2,
                     "combine": "leaf", "bits_from": "projection", "n_matrices": 4}, c
    elif file == "cond":
        c = arch[-1]
        assert c == {"kind": "cond", "gate": "topk", "d_out": 3, "n_experts": 4, "k": 2,
                     "n_matrices": 4}, c
        assert tuple(state["layers.2.experts.w1"].shape) == (4, 8, 5)
        try:
            ctl.to_torch_module(arch, state)
            print("to_torch_module accepted a conditional layer"); bad += 1
        except NotImplementedError:
            pass
    else:
        assert [l["kind"] for l in arch] == ["input", "linear", "relu", "linear", "tanh", "linear"]
        model = ctl.to_torch_module(arch, state)
        x = want[("mlp", "x")].reshape(-1, 5)
        y = model(x).detach()
        err = (y - want[("mlp", "y")].reshape(-1, 3)).abs().max().item()
        print(f"mlp: torch forward vs ccr: max |diff| {err:.3g}")
        if err > 1e-5:
            bad += 1
        ctl.save(f"{d}/mlp2.safetensors", {k: 2 * v for k, v in state.items()}, meta)
# Strings the parser must refuse: the pre-issue-9 form, unknown, repeated or
# misordered options, a bad value, no bank size, a signed count.
for s in ("6;cond:topk:3:E4:k2:a1:k1:d0:m4", "6;cond:topk:3:n_experts=4:frob=1:matrices=4",
          "6;cond:topk:3:k=2:n_experts=4:matrices=4", "6;cond:topk:3:k=2:k=2:matrices=4",
          "6;cond:signtree:3:combine=sum:matrices=3", "6;cond:topk:3:n_experts=4:k=2",
          "6;cond:topk:3:n_experts=-4:matrices=4", " 6;linear:3"):
    try:
        ctl.parse_architecture(s)
        print(f"parse_architecture accepted {s!r}"); bad += 1
    except ValueError:
        pass
sys.exit(1 if bad else 0)
PY
}

check "$tmp/values.txt"
"$prog" read "$tmp"

# The comparison notices a changed value.
awk 'NR == 1 { $4 = $4 + 1 } { print }' "$tmp/values.txt" > "$tmp/values_bad.txt"
if check "$tmp/values_bad.txt" >"$tmp/out" 2>&1 || ! grep -q "want" "$tmp/out"; then
  echo "torch_load: a changed value went unnoticed:"; cat "$tmp/out"; exit 1
fi
echo "torch_load: changed value noticed"
