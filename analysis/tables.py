#!/usr/bin/env python3
"""JSON Lines results -> markdown tables for docs/RESULTS.md.

    /usr/bin/python3 analysis/tables.py train FILE.jsonl [FILE.jsonl ...]
    /usr/bin/python3 analysis/tables.py bench CCR.jsonl [TORCH.jsonl]

`train` prints one row per epoch of ccr-train records; `bench` prints the
ccr-bench-mlp records, with the PyTorch peer's step time and the ratio when
a torch_mlp_bench.py file is given.  Standard library only.
"""
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(paths):
    print("| run | epoch | train loss | train acc | valid acc | test loss | test acc | epoch s | total s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        for r in load(p):
            where = r["backend"] + ("" if r["backend"] == "cuda" else f" ({r['blas_core']}, {r['blas_threads']} thr)")
            print(f"| {where} | {r['epoch']} | {r['train_loss']:.4f} | {r['train_acc']:.4f} | "
                  f"{r['valid_acc']:.4f} | {r['test_loss']:.4f} | {r['test_acc']:.4f} | "
                  f"{r['epoch_seconds']:.2f} | {r['seconds']:.1f} |")


def bench(paths):
    ccr = load(paths[0])
    peer = {r["batch"]: r for r in load(paths[1])} if len(paths) > 1 else {}
    head = ("| batch | step ms | step GFLOP/s | same-shape GEMMs ms | GEMM GFLOP/s | "
            "square sgemm GFLOP/s | input copy ms | step / GEMMs |")
    sep = "|---:|---:|---:|---:|---:|---:|---:|---:|"
    if peer:
        head += " torch step ms | torch / ccr |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for r in ccr:
        row = (f"| {r['batch']} | {r['step_seconds'] * 1e3:.3f} | {r['step_gflops']:.1f} | "
               f"{r['gemm_seconds'] * 1e3:.3f} | {r['gemm_gflops']:.1f} | {r['square_gflops']:.1f} | "
               f"{r['input_copy_seconds'] * 1e3:.3f} | {r['ratio_step_to_gemm']:.2f} |")
        if peer and r["batch"] in peer:
            t = peer[r["batch"]]["step_seconds"]
            row += f" {t * 1e3:.3f} | {t / r['step_seconds']:.2f} |"
        print(row)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("train", "bench"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    (train if sys.argv[1] == "train" else bench)(sys.argv[2:])
