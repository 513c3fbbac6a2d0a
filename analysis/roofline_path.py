#!/usr/bin/env python3
"""roofline_path.py - the sign-bit path tree's forward + backward against a
per-level roofline (issue 10, target 3), from ccr-bench records:

    /usr/bin/python3 analysis/roofline_path.py docs/results/bench_path.jsonl

For a path tree of depth d (d_in = d_out = D, batch B, --grad-mode ste) each
level l = 0..d holds 2^l node matrices of D x D floats and every example
passes through one of them.  Per level the layer does three matrix passes
over the batch (forward, dW, dx: 2 B D^2 FLOPs each) and, below the root,
a fourth for the straight-through gradient (the sibling's output); it reads
each used matrix in the forward, dx (and sibling) passes and writes and
re-reads its gradient (`level_cost`).  A level's roofline time is
max(FLOPs / P, bytes / W) with P = the record's square sgemm GFLOP/s and
W = its copy GB/s, both measured in the same run; the tree's roofline is
the sum over levels.  Printed: measured and roofline µs per example, the
compute-only and bandwidth-only sums, and roofline / measured.  A model,
stated here in full: no overlap between levels, no cache reuse across
passes, the combine and the gate's own work not counted.

Per level (second table, when the file holds consecutive depths at one
batch and width): level l's measured cost is the difference of the trees
of depth l and l - 1 (the same layer with one level more: one more matrix
pass per example in each direction, one more sign bit), against that
level's roofline, with its bound (compute or bandwidth) named.
"""
import json
import sys


def level_cost(level, batch, dim):
    """(FLOPs, bytes) of one level's forward + backward."""
    passes = 4 if level > 0 else 3          # fwd, dW, dx (+ the sibling's eval)
    used = min(2 ** level, batch)           # matrices this batch touches
    mat = dim * dim * 4
    flops = passes * 2 * batch * dim * dim
    # W read by fwd and dx (and the sibling's by ste); dW written and re-read
    byts = (passes - 1 + 2) * used * mat
    return flops, byts


def main(path):
    recs = [json.loads(l) for l in open(path) if l.strip()]
    recs = [r for r in recs if r.get("gate") == "signtree" and r.get("combine") == "path"]
    if not recs:
        sys.exit(f"roofline_path.py: {path}: no signtree path records")
    print("| depth | params | measured µs/ex | roofline µs/ex | compute-only | bandwidth-only "
          "| roofline / measured |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(recs, key=lambda r: r["depth"]):
        b, d, dim = r["batch"], r["depth"], r["d_in"]
        peak, bw = r["gflops_sgemm_square"] * 1e9, r["copy_gbs"] * 1e9
        t = tc = tb = 0.0
        for lev in range(d + 1):
            f, by = level_cost(lev, b, dim)
            t += max(f / peak, by / bw)
            tc += f / peak
            tb += by / bw
        meas = r["seconds_fwdbwd"]
        print(f"| {d} | {r['params']:.3g} | {meas / b * 1e6:.1f} | {t / b * 1e6:.1f} "
              f"| {tc / b * 1e6:.1f} | {tb / b * 1e6:.1f} | {t / meas:.2f} |")
    per_level(recs)


def per_level(recs):
    """Level l's measured cost as depth l minus depth l - 1."""
    by = {(r["batch"], r["d_in"], r["depth"]): r for r in recs}
    rows = []
    for (b, dim, d), r in sorted(by.items()):
        prev = by.get((b, dim, d - 1))
        if d == 0 or prev is None:
            continue
        delta = (r["seconds_fwdbwd"] - prev["seconds_fwdbwd"]) / b * 1e6
        peak = 0.5 * (r["gflops_sgemm_square"] + prev["gflops_sgemm_square"]) * 1e9
        bw = 0.5 * (r["copy_gbs"] + prev["copy_gbs"]) * 1e9
        f, byts = level_cost(d, b, dim)
        tc, tb = f / peak / b * 1e6, byts / bw / b * 1e6
        rows.append((b, dim, d, 2 ** d, b / 2 ** d, delta, max(tc, tb),
                     "compute" if tc >= tb else "bandwidth"))
    if not rows:
        return
    print()
    print("| batch | width | level | matrices | examples per matrix | measured µs/ex "
          "(depth l - depth l-1) | roofline µs/ex | bound | roofline / measured |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for b, dim, d, n, epm, delta, roof, bound in rows:
        ratio = f"{roof / delta:.2f}" if delta > 0 else "n/a"
        print(f"| {b} | {dim} | {d} | {n} | {epm:.3g} | {delta:.2f} | {roof:.2f} | {bound} "
              f"| {ratio} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: roofline_path.py FILE.jsonl")
    main(sys.argv[1])
