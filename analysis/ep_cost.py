#!/usr/bin/env python3
"""ep_cost.py - a cost model of expert-parallel training (issue 12).

Reads ccr-train records of one configuration run on 1 and more MPI
processes (docs/results/ep_train_np*.jsonl), fits the model's two machine
constants to them, checks its prediction against every measured point, and
extrapolates the step time and the capacity per FLOP to P = 8 .. 4096 ranks
with experts growing with the ranks (Shazeer et al. 2017, section 3.1:
experts per rank, batch per rank and step time constant).

Model of one training step with global batch B on P ranks, k experts per
example, conditional layers l with widths (i_l, o_l), G replicated
parameters:
  compute    c B / min(P, cores)              c: seconds per example on one
                                              core (the P = 1 run's compute)
  all-to-all bytes_a2a(P) / bw                bytes a rank sends: per layer,
             + rounds_a2a (P - 1) alpha       its B/P examples' k rows out and
                                              back, forward and backward,
                                              4 (2 i_l + 2 o_l) bytes a row,
                                              the share (P - 1)/P remote
  all-reduce 2 (P - 1)/P 4 G / bw             a ring's bandwidth term, a
             + rounds_ar 2 log2(P) alpha      tree's latency term (small
                                              messages: batch sizes, stats)
rounds_a2a = 4 per layer (counts, descriptors and rows out, rows back, in
the forward; two in the backward: 6), rounds_ar = the all-reduces ccr
makes per step (batch sizes and statistics per layer, loss, one per
replicated tensor).  bw and alpha are either fitted to the measured P = 2
run (the bytes and seconds rank 0 recorded: alpha = 0, bw = bytes / s, the
simplest fit with one point) or given (--bw-gbs, --latency-us) for the
extrapolation; the fitted values on one shared-memory machine say nothing
about a network and are labelled so.

Usage:
  ep_cost.py RECORDS.jsonl... [--cores N] [--bw-gbs X] [--latency-us X]
             [--experts-per-rank N] [--out TABLE.md]
Prints the validation table (measured against predicted epoch seconds,
per measured P) and the extrapolation table (markdown).
"""
import argparse
import math
import json
import re
import sys


def last_record(path):
    recs = [json.loads(line) for line in open(path) if line.strip()]
    if not recs:
        sys.exit("ep_cost.py: %s holds no record" % path)
    return recs[-1]


def layer_widths(arch):
    """(d_in, d_out) of every conditional layer of an arch string such as
    784-topk512-topk256-10; and the widths of all layers."""
    parts = arch.split("-")
    widths = [int(re.sub(r"^[a-z]+|\+$", "", p)) for p in parts]
    cond = [(widths[i - 1], widths[i]) for i, p in enumerate(parts) if i > 0 and
            re.match(r"^[a-z]", p)]
    return cond, widths


class Model:
    def __init__(self, rec1, cores):
        self.B = rec1["batch"]
        self.k = rec1.get("k", 1)
        self.steps = max(1, -(-rec1["n_train"] // self.B))
        self.c = rec1["seconds_compute"] / (self.steps * self.B)
        self.cond, self.widths = layer_widths(rec1["arch"])
        self.cores = cores
        self.E = rec1["experts"]
        self.params = rec1["params"]
        self.flops = rec1["flops_fwd_per_example"]
        # Replicated parameters: everything but the banks (FFN experts
        # d_in -> h -> d_out with h = the hidden width of the gate options;
        # taken here as params minus E x the bank's share).
        self.bank = 0
        h = rec1.get("expert_hidden", rec1.get("hidden", 0))
        for i, o in self.cond:
            hh = h or o
            self.bank += self.E * (i * hh + hh + hh * o + o)
        self.replicated = max(0, self.params - self.bank)
        n_tensors = 2 * (len(self.widths) - 1 - len(self.cond)) + 2 * len(self.cond)
        self.rounds_a2a = 6 * len(self.cond)
        self.rounds_ar = 2 * len(self.cond) + 3 + n_tensors

    def a2a_bytes(self, P):
        rows = self.B / P * self.k * (P - 1) / P
        return sum(rows * 4 * (2 * i + 2 * o) for i, o in self.cond)

    def ar_bytes(self, P):
        return 2 * (P - 1) / P * 4 * self.replicated

    def step(self, P, bw, alpha, cores=None):
        cores = cores or self.cores
        comp = self.c * self.B / min(P, cores)
        a2a = self.a2a_bytes(P) / bw + self.rounds_a2a * (P - 1) * alpha if P > 1 else 0.0
        ar = (self.ar_bytes(P) / bw + self.rounds_ar * 2 * math.log2(P) * alpha
              if P > 1 else 0.0)
        return comp, a2a, ar


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+")
    ap.add_argument("--cores", type=int, default=2,
                    help="cores the measured ranks shared [2, the development machine]")
    ap.add_argument("--bw-gbs", type=float, default=12.5,
                    help="extrapolation: link bandwidth per rank, GB/s [12.5: 100 Gb/s, an "
                         "assumption]")
    ap.add_argument("--latency-us", type=float, default=5.0,
                    help="extrapolation: latency per message, us [5, an assumption]")
    ap.add_argument("--experts-per-rank", type=int, default=0,
                    help="extrapolation: experts per rank [E of the P = 2 run / 2]")
    ap.add_argument("--out", help="also write the tables here")
    a = ap.parse_args()

    recs = sorted((last_record(p) for p in a.records), key=lambda r: r["ranks"])
    by_p = {r["ranks"]: r for r in recs}
    if 1 not in by_p or len(by_p) < 2:
        sys.exit("ep_cost.py: needs a P = 1 record and at least one with P > 1")
    m = Model(by_p[1], a.cores)
    # Fit: the smallest P > 1 gives bw (alpha = 0).
    p_fit = min(p for p in by_p if p > 1)
    rf = by_p[p_fit]
    comm_s = (rf["seconds_alltoall"] + rf["seconds_allreduce"]) / m.steps
    comm_b = rf["alltoall_bytes_per_step"] + rf["allreduce_bytes_per_step"]
    bw_fit = comm_b / comm_s if comm_s > 0 else float("inf")

    out = []
    out.append("Fitted to the P = %d run: %.3g GB/s effective (bytes rank 0 sent per second "
               "in collectives, waiting included), latency 0; c = %.3g s per example on one "
               "core; %d cores shared.\n" % (p_fit, bw_fit / 1e9, m.c, a.cores))
    out.append("| P | measured epoch s | predicted s | error | measured a2a bytes/step | "
               "predicted |")
    out.append("|---:|---:|---:|---:|---:|---:|")
    for P, r in sorted(by_p.items()):
        comp, a2a, ar = m.step(P, bw_fit, 0.0)
        pred = (comp + a2a + ar) * m.steps
        meas = r["epoch_seconds"]
        out.append("| %d | %.3f | %.3f | %+.0f%% | %.0f | %.0f |" % (
            P, meas, pred, 100 * (pred - meas) / meas, r["alltoall_bytes_per_step"],
            m.a2a_bytes(P)))
    epr = a.experts_per_rank or max(1, m.E // 2)
    bw, alpha = a.bw_gbs * 1e9, a.latency_us * 1e-6
    out.append("")
    out.append("Extrapolation (assumed network: %.3g GB/s per rank, %.3g us per message; one "
               "core per rank; %d experts per rank, batch %d per rank):\n"
               % (a.bw_gbs, a.latency_us, epr, m.B // 2))
    out.append("| P | experts | params | FLOPs/example | params per FLOP | step s | compute | "
               "all-to-all | all-reduce | examples/s |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    per_rank_b = m.B // 2
    for P in (8, 16, 64, 256, 1024, 4096):
        E = epr * P
        params = m.replicated + m.bank / m.E * E
        mm = Model(dict(by_p[1], batch=per_rank_b * P, experts=E, params=params), P)
        comp, a2a, ar = mm.step(P, bw, alpha, cores=P)
        comp = m.c * per_rank_b  # one core per rank, B/P = per_rank_b examples
        step = comp + a2a + ar
        out.append("| %d | %d | %.3g | %.3g | %.3g | %.3g | %.3g | %.3g | %.3g | %.3g |" % (
            P, E, params, m.flops, params / m.flops, step, comp, a2a, ar,
            per_rank_b * P / step))
    text = "\n".join(out) + "\n"
    sys.stdout.write(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
