#!/usr/bin/env python3
"""Validate a ccr JSON Lines results file (used by the driver tests).

    check_results.py FILE [--min-records N] [--require f1,f2,...]
                          [--finite f1,f2,...] [--equal a=b,c=d] [--rel-tol X]

Every line must be a JSON object.  --require: each record has these fields
(the base fields driver, git, machine, blas_core, seed are always required).
--finite: these fields are finite numbers in every record.  --equal a=b:
fields a and b are equal within --rel-tol (default 1e-9) in every record that
has both, e.g. flops_counted=flops_analytic.  Exit 0 when all hold; 1 with
one line per failure otherwise.  Standard library only.
"""
import argparse
import json
import math
import sys

BASE = ["driver", "git", "machine", "blas_core", "seed"]


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("file")
    p.add_argument("--min-records", type=int, default=1)
    p.add_argument("--require", default="")
    p.add_argument("--finite", default="")
    p.add_argument("--equal", default="")
    p.add_argument("--rel-tol", type=float, default=1e-9)
    a = p.parse_args(argv[1:])
    need = BASE + [f for f in a.require.split(",") if f]
    finite = [f for f in a.finite.split(",") if f]
    pairs = [tuple(e.split("=", 1)) for e in a.equal.split(",") if e]
    errors = []
    try:
        with open(a.file) as fh:
            lines = [ln for ln in fh if ln.strip()]
    except OSError as e:
        print(f"check_results: {e}")
        return 1
    if len(lines) < a.min_records:
        errors.append(f"{len(lines)} records, want >= {a.min_records}")
    for i, ln in enumerate(lines, 1):
        try:
            r = json.loads(ln)
        except json.JSONDecodeError as e:
            errors.append(f"line {i}: not JSON ({e})")
            continue
        if not isinstance(r, dict):
            errors.append(f"line {i}: not an object")
            continue
        for f in need + finite:
            if f not in r:
                errors.append(f"line {i}: missing '{f}'")
        for f in finite:
            v = r.get(f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                errors.append(f"line {i}: '{f}' = {v!r} is not a finite number")
        for x, y in pairs:
            if x in r and y in r:
                vx, vy = r[x], r[y]
                if abs(vx - vy) > a.rel_tol * max(abs(vx), abs(vy), 1e-300):
                    errors.append(f"line {i}: {x}={vx} != {y}={vy}")
    for e in errors[:20]:
        print(f"check_results: {a.file}: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
