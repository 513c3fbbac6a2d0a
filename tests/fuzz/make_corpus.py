#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/<target>/:
tiny valid inputs and edge cases, byte for byte the same on every run (gzip
with mtime 0).  Run from anywhere; the files are committed.
Usage: make_corpus.py [OUT_DIR]"""
import gzip
import json
import os
import struct
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def gz(b):
    return gzip.compress(b, mtime=0)


def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- safetensors: u64 LE header length, JSON header, data section ----
def st(header, data=b"", raw=None):
    h = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


f32 = lambda *v: struct.pack("<%df" % len(v), *v)
i32 = lambda *v: struct.pack("<%di" % len(v), *v)
put("safetensors", "valid_f32", st({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                                    "__metadata__": {"gate": "topk", "arch": "mlp"}}, f32(1, 2, 3, 4)))
put("safetensors", "valid_two", st({"a": {"dtype": "I32", "shape": [], "data_offsets": [0, 4]},
                                    "b": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]}},
                                   i32(7) + f32(0.5, -1, 2)))
put("safetensors", "valid_empty", st({}))
put("safetensors", "valid_zero_dim", st({"z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}))
put("safetensors", "valid_unicode", st(None, f32(1), raw='{"\\u00e9t\\u00e9":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.encode()))
put("safetensors", "bad_overlap", st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, f32(1, 2)))
put("safetensors", "bad_dtype", st({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4))
put("safetensors", "bad_shape_big", st({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}, f32(1)))
put("safetensors", "bad_header_len", struct.pack("<Q", 1 << 40) + b"{}")
put("safetensors", "bad_json", st(None, raw=b'{"a":{"dtype":"F32",'))
put("safetensors", "bad_truncated", b"\x10\x00\x00")
put("safetensors", "bad_dup", st(None, f32(1, 2), raw=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'))

# ---- IDX: whole input for ccr_idx_load; byte 0 = image file length for
# ccr_dataset_load_idx (images = bytes 1..1+b, labels = the rest) ----
def idx(type_code, dims, payload):
    return bytes([0, 0, type_code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


imgs = idx(0x08, [2, 2, 2], bytes([0, 64, 128, 255, 1, 2, 3, 4]))
labs = idx(0x08, [2], bytes([0, 3]))
put("idx", "u8_images", imgs)
put("idx", "u8_labels", labs)
put("idx", "i8", idx(0x09, [3], bytes([0x80, 0, 0x7F])))
put("idx", "i16", idx(0x0B, [2], struct.pack(">hh", -2, 300)))
put("idx", "i32", idx(0x0C, [1, 2], struct.pack(">ii", -7, 1 << 30)))
put("idx", "f32", idx(0x0D, [2], struct.pack(">ff", 1.5, -0.25)))
put("idx", "f64", idx(0x0E, [1], struct.pack(">d", 3.25)))
put("idx", "f32_nan", idx(0x0D, [1], struct.pack(">I", 0x7FC00000)))
put("idx", "gz_labels", gz(labs))
put("idx", "huge_claim", idx(0x08, [65536, 65536], b""))
put("idx", "trailing", labs + b"\0")
put("idx", "truncated", idx(0x08, [4], b"\1\2"))
put("idx", "dataset", bytes([len(imgs)]) + imgs + labs)
put("idx", "dataset_gz", bytes([len(gz(imgs))]) + gz(imgs) + gz(labs))
nan_imgs = idx(0x0D, [2, 1], struct.pack(">fI", 0.5, 0x7FC00000))
put("idx", "dataset_nan", bytes([len(nan_imgs)]) + nan_imgs + labs)   # refused since the fuzz run
put("idx", "dataset_mismatch", bytes([len(imgs)]) + imgs + idx(0x08, [3], bytes([0, 1, 2])))

# ---- corpus: byte 0 = level (bit 0: char) | vocab size << 1, byte 1 =
# max_tokens (0 = no limit), then the text ----
text = b"The cat sat. The dog's bone, (old) fell!\n\nWhy? \"Yes\": no; 42 cats.\n"
put("corpus", "word_all", bytes([0, 0]) + text)
put("corpus", "word_vocab8", bytes([8 << 1, 0]) + text)
put("corpus", "word_limit", bytes([0, 5]) + text)
put("corpus", "word_gz", bytes([6 << 1, 0]) + gz(text * 4))
put("corpus", "word_bad_vocab", bytes([2 << 1, 0]) + text)
put("corpus", "word_utf8", bytes([0, 0]) + "caf\u00e9 na\u00efve \u00fcber. \u2014 ok\r\n".encode())
put("corpus", "word_empty", bytes([0, 0]))
put("corpus", "word_only_punct", bytes([0, 0]) + b"...!!??\n\n\n")
put("corpus", "char_all", bytes([1, 0]) + text)
put("corpus", "char_limit", bytes([1, 7]) + text)
put("corpus", "char_bytes", bytes([1, 0]) + bytes(range(256)))
put("corpus", "char_newlines", bytes([1, 0]) + b"\n\n\na\n")

# ---- driver option values: NUL-separated arguments ----
args = {
    "sizes": ["0", "1", "007", "18446744073709551615", "18446744073709551616", " -1", "-1", "+1",
              "1e3", "0x10", "12abc", ""],
    "doubles": ["0.5", ".5", "5.", "1e-3", "2.5E+1", "-2.5", "nan", "inf", "-inf", " 0.1", "1e400",
                "1e-400", "0x1p-3", "1e", "-0"],
    "seeds": ["1", "4294967295", "4294967296", "0"],
    "lists": ["1,2,3", "1,,2", "1,", ",1", "1, 2", "moe-4,moe-32", "path,leaf,,"],
    "gate": ["-experts", "16", "-combine", "leaf", "*noise-eps", "1e-3", "@gate", "topk",
             "(randomize"],
}
for name, vals in args.items():
    put("args", name, b"\0".join(v.encode() for v in vals))
