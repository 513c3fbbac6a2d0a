#!/usr/bin/env python3
"""Plain-PyTorch reader (and writer) of ccr's safetensors checkpoints.

Debian's python3-torch (1.13) ships without the ``safetensors`` module, so
this file reads ccr's checkpoints with the standard library, numpy and torch
only (the parsing and its format checks are ``safetensors_read.read``).

    import sys; sys.path.insert(0, "analysis")
    import ccr_torch_load as ctl

    state, meta = ctl.load("net.safetensors")     # {"layers.0.w": tensor, ...}
    arch = ctl.parse_architecture(meta["architecture"])
    model = ctl.to_torch_module(arch, state)       # nn.Sequential (MLPs only)
    ...
    ctl.save("edited.safetensors", state, meta)    # ccr_net_load reads it back

Conventions (docs/DESIGN.md, "Checkpoints"):
  * tensors are stored as ``param.<name>`` (and ``grad.<name>`` when a
    gradient checkpoint was asked for); ``load`` returns the ``param.``
    tensors with the prefix removed, in file order;
  * a linear layer's W is ``[d_in, d_out]`` (row-vector convention,
    y = x W + b), the transpose of ``torch.nn.Linear.weight``;
    ``to_torch_module`` transposes;
  * ``__metadata__`` holds ``format`` (``ccr.net``), ``ccr_version`` and
    ``architecture``, e.g. ``784;linear:64;relu;cond:topk:64:n_experts=8:k=2:matrices=8``
    (grammar in docs/DESIGN.md, "Files").

Conditional layers (``cond:...``) are parsed but have no torch module here;
``analysis/torch_check.py`` re-implements every gate in PyTorch.

Command line:
    /usr/bin/python3 analysis/ccr_torch_load.py FILE [--json]
lists the architecture and every tensor (name, shape, sum); exit status 1
with a message if the file is malformed.
"""
import collections
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_read  # noqa: E402  (same directory)

ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
               "identity": torch.nn.Identity}
TORCH_DTYPES = {torch.float32: "F32", torch.int32: "I32"}


def load(path, prefix="param."):
    """(OrderedDict name -> torch.Tensor, metadata dict) of the tensors whose
    name starts with prefix (removed).  prefix="" returns every tensor under
    its stored name.  Raises ValueError for a malformed file."""
    arrays, meta = safetensors_read.read(path)
    state = collections.OrderedDict()
    for name, a in arrays.items():
        if name.startswith(prefix):
            state[name[len(prefix):]] = torch.from_numpy(np.array(a))
    return state, meta


# The structural options of a conditional layer, in the order the
# architecture string lists them (src/nn.c net_describe; docs/DESIGN.md,
# "Files"), with their values' types.
COND_OPTIONS = [("n_experts", int), ("k", int), ("n_groups", int), ("k_groups", int),
                ("k2", int), ("depth", int), ("combine", ("path", "leaf")),
                ("bits_from", ("projection", "input"))]


def _count(v):
    """A decimal size_t: digits only (no sign, no spaces)."""
    if not v.isdigit() or not v.isascii():
        raise ValueError(f"{v!r} is not a count")
    return int(v)


def _parse_cond(f):
    """The dict of one "cond:GATE:D_OUT(:option=value)*:matrices=N" item
    (f: its ":"-separated fields)."""
    if len(f) < 4:
        raise ValueError("cond: too few fields")
    c = {"kind": "cond", "gate": f[1], "d_out": _count(f[2])}
    if not f[1]:
        raise ValueError("cond: empty gate name")
    last, next_opt = f[-1], 0
    if not last.startswith("matrices="):
        raise ValueError(f"cond: last field {last!r} should be matrices=N")
    c["n_matrices"] = _count(last[len("matrices="):])
    for v in f[3:-1]:
        key, eq, val = v.partition("=")
        names = [n for n, _ in COND_OPTIONS]
        if not eq or key not in names:
            raise ValueError(f"cond: unknown field {v!r}")
        i = names.index(key)
        if i < next_opt:
            raise ValueError(f"cond: option {key!r} repeated or out of order")
        next_opt = i + 1
        kind = COND_OPTIONS[i][1]
        if kind is int:
            c[key] = _count(val)
        elif val in kind:
            c[key] = val
        else:
            raise ValueError(f"cond: {key}={val!r}, want one of {', '.join(kind)}")
    return c


def parse_architecture(s):
    """The layers of an architecture string, as dicts:
    {"kind": "input", "d": d_in} first, then {"kind": "linear", "d_out": n},
    {"kind": "relu"} (tanh, sigmoid, identity), or {"kind": "cond",
    "gate": name, "d_out": n, "n_matrices": n} plus one key per option the
    string lists (the gate's structural options: "n_experts", "k",
    "n_groups", "k_groups", "k2", "depth" as ints, "combine" and
    "bits_from" as strings), e.g. "cond:topk:64:n_experts=8:k=2:matrices=8".
    Raises ValueError on anything else (the pre-issue-9 form
    "cond:topk:64:E8:k2:a1:k1:d0:m8" included)."""
    parts = s.split(";")
    try:
        layers = [{"kind": "input", "d": _count(parts[0])}]
        for p in parts[1:]:
            f = p.split(":")
            if f[0] in ACTIVATIONS and len(f) == 1:
                layers.append({"kind": f[0]})
            elif f[0] == "linear" and len(f) == 2:
                layers.append({"kind": "linear", "d_out": _count(f[1])})
            elif f[0] == "cond":
                layers.append(_parse_cond(f))
            else:
                raise ValueError(f"unknown layer {p!r}")
    except (ValueError, IndexError) as e:
        raise ValueError(f"architecture {s!r}: {e}") from None
    return layers


def to_torch_module(arch, state):
    """A torch.nn.Sequential computing the same function as a ccr network of
    linear and activation layers (arch: parse_architecture's list or the
    string), with the checkpoint's values.  NotImplementedError for a
    conditional layer."""
    if isinstance(arch, str):
        arch = parse_architecture(arch)
    mods, d = [], arch[0]["d"]
    for i, layer in enumerate(arch[1:]):
        kind = layer["kind"]
        if kind == "linear":
            w, b = state[f"layers.{i}.w"], state[f"layers.{i}.b"]
            if tuple(w.shape) != (d, layer["d_out"]) or tuple(b.shape) != (layer["d_out"],):
                raise ValueError(f"layers.{i}: shapes {tuple(w.shape)}, {tuple(b.shape)} "
                                 f"do not match {d} -> {layer['d_out']}")
            lin = torch.nn.Linear(d, layer["d_out"])
            with torch.no_grad():
                lin.weight.copy_(w.t())
                lin.bias.copy_(b)
            mods.append(lin)
            d = layer["d_out"]
        elif kind in ACTIVATIONS:
            mods.append(ACTIVATIONS[kind]())
        else:
            raise NotImplementedError(f"layer {i}: conditional layer ({layer['gate']}) has no "
                                      "torch module here; see analysis/torch_check.py")
    return torch.nn.Sequential(*mods)


def save(path, state, metadata=None, prefix="param."):
    """Writes tensors (name -> torch.Tensor, float32 or int32) as a safetensors
    file ccr reads (ccr_net_load / ccr_arena_load), names prefixed with
    prefix, metadata values converted to strings.  Written to path + ".tmp"
    and renamed."""
    header, blobs, off = {}, [], 0
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in TORCH_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} (ccr reads float32 and int32)")
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[prefix + name] = {"dtype": TORCH_DTYPES[t.dtype], "shape": list(t.shape),
                                 "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    path = argv[1]
    try:
        state, meta = load(path, prefix="")
        arch = parse_architecture(meta["architecture"]) if "architecture" in meta else None
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        print(f"ccr_torch_load: {path}: {e}", file=sys.stderr)
        return 1
    summary = {"metadata": meta, "architecture": arch,
               "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape),
                               "sum": float(v.double().sum())} for k, v in state.items()}}
    if "--json" in argv:
        print(json.dumps(summary))
    else:
        if arch is not None:
            print("architecture:", meta["architecture"])
        for k, v in summary["tensors"].items():
            print(f"{k:32s} {v['dtype']:14s} {v['shape']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
