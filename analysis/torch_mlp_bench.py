#!/usr/bin/env python3
"""PyTorch peer for ccr-bench-mlp: the same MLP training step (784-512-256-10
ReLU, softmax cross-entropy, Adam) timed with Debian's python3-torch on the
CPU, so docs/RESULTS.md can put ccr's step time beside a widely used
implementation measured in the same session.

    /usr/bin/python3 analysis/torch_mlp_bench.py [--threads 2] [--batches 32,128,512]
                                                 [--seconds 0.5] [--out FILE]

Prints a markdown table; with --out writes one JSON object per batch size.
"""
import argparse
import json
import platform
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="32,128,512")
    p.add_argument("--hidden", default="512,256")
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    widths = [784] + [int(h) for h in a.hidden.split(",")] + [10]
    loss_fn = torch.nn.CrossEntropyLoss()
    mm = sum(widths[i] * widths[i + 1] for i in range(len(widths) - 1))
    rows = []
    print(f"torch {torch.__version__}, {a.threads} threads, {platform.processor() or platform.machine()}")
    print("| batch | step ms | GFLOP/s (ccr's count) |")
    print("|---:|---:|---:|")
    for b in (int(x) for x in a.batches.split(",")):
        # As in ccr-bench-mlp: a fresh network per batch size, a pool of 8
        # batches cycled through, a short timing window.
        layers = []
        for i in range(len(widths) - 1):
            layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
            if i + 2 < len(widths):
                layers.append(torch.nn.ReLU())
        net = torch.nn.Sequential(*layers)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        pool = [(torch.rand(b, widths[0]), torch.randint(0, widths[-1], (b,))) for _ in range(8)]

        def step(j):
            x, y = pool[j % 8]
            opt.zero_grad(set_to_none=False)
            loss_fn(net(x), y).backward()
            opt.step()

        step(0)
        reps, t0 = 0, time.perf_counter()
        while True:
            step(reps)
            reps += 1
            el = time.perf_counter() - t0
            if el >= a.seconds:
                break
        t = el / reps
        # ccr's exact count: forward 2*mm + biases, backward 2*mm + biases + dx for layers > 0.
        flops = b * (2 * mm + 2 * sum(widths[1:]) + 2 * mm
                     + 2 * sum(widths[i] * widths[i + 1] for i in range(1, len(widths) - 1)))
        rows.append({"peer": "torch", "torch_version": torch.__version__, "threads": a.threads,
                     "batch": b, "step_seconds": t, "step_gflops": flops / t * 1e-9})
        print(f"| {b} | {t * 1e3:.3f} | {flops / t * 1e-9:.1f} |")
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
