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
    ``architecture``, e.g. ``784;linear:64;relu;cond:topk:10:E8:k2:a1:k1:d0:m8``.

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


def parse_architecture(s):
    """The layers of an architecture string, as dicts:
    {"kind": "input", "d": d_in} first, then {"kind": "linear", "d_out": n},
    {"kind": "relu"} (tanh, sigmoid, identity), or {"kind": "cond",
    "gate": name, "d_out": n, "n_experts", "k", "n_groups", "k2", "depth",
    "n_matrices": ints}.  Raises ValueError on anything else."""
    parts = s.split(";")
    try:
        layers = [{"kind": "input", "d": int(parts[0])}]
        for p in parts[1:]:
            f = p.split(":")
            if f[0] in ACTIVATIONS and len(f) == 1:
                layers.append({"kind": f[0]})
            elif f[0] == "linear" and len(f) == 2:
                layers.append({"kind": "linear", "d_out": int(f[1])})
            elif f[0] == "cond" and len(f) == 9:
                keys = [("E", "n_experts"), ("k", "k"), ("a", "n_groups"), ("k", "k2"),
                        ("d", "depth"), ("m", "n_matrices")]
                c = {"kind": "cond", "gate": f[1], "d_out": int(f[2])}
                for (tag, key), v in zip(keys, f[3:]):
                    if not v.startswith(tag):
                        raise ValueError(f"field {v!r} should start with {tag!r}")
                    c[key] = int(v[len(tag):])
                layers.append(c)
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
