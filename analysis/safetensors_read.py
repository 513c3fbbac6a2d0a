#!/usr/bin/env python3
"""Independent safetensors reader (standard library + numpy), used to check
that files written by ccr load the way PyTorch users' readers load them.

    safetensors_read.py FILE            list tensors and metadata
    safetensors_read.py FILE --json     the same as one JSON object

It enforces the format rules of the reference implementation: 8-byte
little-endian header length, a JSON object header, every tensor's
data_offsets relative to the byte after the header, contiguous and covering
the whole data section, byte size = product(shape) * dtype size.  Exit
status 1 with a message on any violation.
"""
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.dtype("<f4"), "I32": np.dtype("<i4"), "F64": np.dtype("<f8"),
          "I64": np.dtype("<i8"), "F16": np.dtype("<f2"), "U8": np.dtype("u1")}


def read(path):
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError(f"header length {n} beyond file size {len(blob)}")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    data = blob[8 + n:]
    spans, tensors = [], {}
    for name, e in header.items():
        dt = DTYPES[e["dtype"]]
        shape = [int(d) for d in e["shape"]]
        begin, end = (int(o) for o in e["data_offsets"])
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * dt.itemsize or end > len(data) or begin > end:
            raise ValueError(f"{name}: offsets {begin}..{end} do not fit shape {shape}")
        spans.append((begin, end))
        tensors[name] = np.frombuffer(data[begin:end], dtype=dt).reshape(shape)
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise ValueError(f"gap or overlap at byte {begin} (expected {pos})")
        pos = end
    if pos != len(data):
        raise ValueError(f"data section has {len(data) - pos} trailing bytes")
    return tensors, meta


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        tensors, meta = read(argv[1])
    except (OSError, ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"safetensors_read: {argv[1]}: {e}", file=sys.stderr)
        return 1
    summary = {"metadata": meta,
               "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape),
                               "sum": float(np.sum(v, dtype=np.float64)),
                               "finite": bool(np.all(np.isfinite(v)))}
                           for k, v in tensors.items()},
               "numel": int(sum(v.size for v in tensors.values()))}
    if "--json" in argv:
        print(json.dumps(summary))
    else:
        for k, v in summary["tensors"].items():
            print(f"{k:30s} {v['dtype']:8s} {v['shape']}")
        print(f"{summary['numel']} elements; metadata {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
