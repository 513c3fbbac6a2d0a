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

Per level (second table, for records with ccr-bench's level_seconds_*):
level l's time is its node matrices' forward and backward seconds from
the layer's own timing and its straight-through sibling evaluations,
divided by the threads that ran the groups side by side (group_threads);
against that level's roofline, its bound (compute or bandwidth)
named.  "rest" is the forward + backward time outside the node matrices
(the rounds' mean time, as the levels' are means, minus the levels):
the gate, the sort, the combine and the dx gather.
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
    """Each level's own time (the layer's per-matrix timing, ccr-bench's
    level_seconds_*) against the level's roofline."""
    recs = [r for r in recs if "level_seconds_fwd" in r]
    if not recs:
        return
    print()
    print("| depth | level | matrices | examples per matrix | measured µs/ex | roofline µs/ex "
          "| bound | roofline / measured |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in sorted(recs, key=lambda r: r["depth"]):
        b, dim, gt = r["batch"], r["d_in"], max(r["group_threads"], 1)
        peak, bw = r["gflops_sgemm_square"] * 1e9, r["copy_gbs"] * 1e9
        inside = 0.0
        for lev, (f_s, b_s, d_s) in enumerate(zip(r["level_seconds_fwd"],
                                                   r["level_seconds_bwd"],
                                                   r["level_seconds_dots"])):
            meas = (f_s + b_s + d_s) / gt
            inside += meas
            f, byts = level_cost(lev, b, dim)
            tc, tb = f / peak, byts / bw
            roof = max(tc, tb)
            print(f"| {r['depth']} | {lev} | {2 ** lev} | {b / 2 ** lev:.3g} "
                  f"| {meas / b * 1e6:.2f} | {roof / b * 1e6:.2f} "
                  f"| {'compute' if tc >= tb else 'bandwidth'} | {roof / meas:.2f} |")
        rest = r.get("seconds_fwdbwd_mean", r["seconds_fwdbwd"]) - inside
        print(f"| {r['depth']} | rest | | | {rest / b * 1e6:.2f} | | gate, sort, combine, "
              f"dx | |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: roofline_path.py FILE.jsonl")
    main(sys.argv[1])
