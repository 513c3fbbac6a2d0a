#!/usr/bin/env python3
"""JSON Lines results -> markdown tables for docs/RESULTS.md.

    /usr/bin/python3 analysis/tables.py train FILE.jsonl [FILE.jsonl ...]
    /usr/bin/python3 analysis/tables.py bench CCR.jsonl [TORCH.jsonl]
    /usr/bin/python3 analysis/tables.py capacity FILE.jsonl [FILE.jsonl ...]
    /usr/bin/python3 analysis/tables.py seeds FILE_s1.jsonl FILE_s2.jsonl ...
    /usr/bin/python3 analysis/tables.py readings FILE_s1.jsonl FILE_s2.jsonl ...
    /usr/bin/python3 analysis/tables.py refresh FRAGMENT.md [FRAGMENT.md ...]

`train` prints one row per epoch of ccr-train records; `bench` prints the
ccr-bench-mlp records, with the PyTorch peer's step time and the ratio when
a torch_mlp_bench.py file is given; `capacity` prints one row per ccr-capacity
point (params, FLOPs, seconds per example and what explains them);
`seeds` takes the last epoch of ccr-train runs that differ only in seed
(files named RUN_sSEED.jsonl) and prints one row per RUN: mean, sample
standard deviation and range over the seeds.
`readings` takes `ccr-tree --readings` runs (one file per seed) and prints,
per data set, tree model and depth, each reading's test and train accuracy
(mean ± sample sd over the seeds) and the best reading at that depth; then,
paired by seed and depth, each reading's test accuracy minus frozen's; then
the mean rank and the mean test accuracy of each reading over all rows.
`refresh` rewrites, in place, every generated block of a markdown file:

    <!-- tables.py capacity capacity.jsonl -->
    ...replaced by the command's output...
    <!-- end tables.py -->

(file names relative to the markdown file), so hand-written text around the
tables survives a regeneration.  Standard library only.
"""
import contextlib
import io
import json
import os
import re
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


CAPACITY_LABEL = {"none": "dense baseline (none)", "topk": "topk", "hmoe": "hmoe",
                  "switch": "switch", "signtree-path": "signtree path",
                  "signtree-leaf": "signtree leaf", "dense": "dense gate"}
KNOB = {"hidden": "h", "experts": "E", "depth": "d"}


def capacity(paths):
    print("| gate | knob | params | FLOPs/ex analytic | FLOPs/ex counted | fwd µs/ex | "
          "fwd+bwd µs/ex | gate fwd µs/ex (eval / train) | zero-grad µs/ex | params/FLOP | "
          "params ÷ dense@FLOPs | matrices used | ex/matrix mean (min) | weights KB/ex | "
          "dropped/batch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        for r in load(p):
            us = lambda k: r[k] * 1e6  # noqa: E731
            print(f"| {CAPACITY_LABEL.get(r['series'], r['series'])} | "
                  f"{KNOB.get(r['knob'], r['knob'])}={r['knob_value']} | {r['params']:,} | "
                  f"{r['flops_fwd_analytic']:,.0f} | {r['flops_fwd_counted']:,.0f} | "
                  f"{us('fwd_seconds_per_example'):.2f} | {us('fwdbwd_seconds_per_example'):.2f} | "
                  f"{us('gate_fwd_seconds_per_example'):.2f} / "
                  f"{us('gate_train_fwd_seconds_per_example'):.2f} | "
                  f"{us('zero_grad_seconds_per_example'):.2f} | {r['params_per_flop']:.3g} | "
                  f"{r['params_vs_dense']:.3g} | {r['matrices_used']:.1f} | "
                  f"{r['examples_per_matrix_mean']:.1f} ({r['examples_per_matrix_min']}) | "
                  f"{r['weight_bytes_per_example'] / 1e3:.1f} | {r['dropped_per_batch']:.1f} |")


def _mean_sd(v):
    m = sum(v) / len(v)
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return m, sd


def seeds(paths):
    runs = {}
    for p in paths:
        name = re.sub(r"_s\d+\.jsonl$", "", os.path.basename(p))
        runs.setdefault(name, []).append(load(p)[-1])
    print("| run | arch | params | fwd FLOPs/ex | seeds | test acc mean ± sd (min-max) | "
          "test loss mean ± sd | CV(load counts) | max/mean count | dropped (last epoch) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        acc = [r["test_acc"] for r in rs]
        am, asd = _mean_sd(acc)
        lm, lsd = _mean_sd([r["test_loss"] for r in rs])
        opt = lambda k, f: f.format(_mean_sd([r[k] for r in rs])[0]) if k in rs[0] else "-"  # noqa: E731
        r0 = rs[0]
        seeds_list = ",".join(str(r["seed"]) for r in rs)
        print(f"| {name} | {r0['arch']} | {r0['params']:,} | {r0['flops_fwd_per_example']:,.0f} | "
              f"{seeds_list} | {am:.4f} ± {asd:.4f} ({min(acc):.4f}-{max(acc):.4f}) | "
              f"{lm:.4f} ± {lsd:.4f} | {opt('cv_load_count', '{:.3f}')} | "
              f"{opt('max_mean_count', '{:.2f}')} | {opt('dropped', '{:.0f}')} |")


READINGS = ["frozen", "ste", "hidden", "hidden-ste", "hidden-proj"]


def readings(paths):
    cells = {}
    for p in paths:
        for r in load(p):
            if "reading" in r:
                key = (r["dataset"], r["model"], r["depth"])
                cells.setdefault(key, {}).setdefault(r["reading"], []).append(r)
    names = [n for n in READINGS if any(n in c for c in cells.values())]
    print("| data set | tree | d | " + " | ".join(
        f"{n}: test acc (train acc)" for n in names) + " | best |")
    print("|---|---|---:|" + "---:|" * len(names) + "---|")
    ranks = {n: [] for n in names}
    accs = {n: [] for n in names}
    for key in sorted(cells):
        c = cells[key]
        means = {n: _mean_sd([r["test_acc"] for r in c[n]])[0] for n in names if n in c}
        order = sorted(means, key=lambda n: -means[n])
        row = []
        for n in names:
            if n not in c:
                row.append("-")
                continue
            tm, tsd = _mean_sd([r["test_acc"] for r in c[n]])
            rm, _ = _mean_sd([r["train_acc"] for r in c[n]])
            row.append(f"{tm:.4f} ± {tsd:.4f} ({rm:.3f})")
            ranks[n].append(order.index(n) + 1)
            accs[n].append(tm)
        seeds_n = min(len(v) for v in c.values())
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(row) +
              f" | {order[0]} (n={seeds_n}) |")
    # Paired by seed and depth against frozen (the synthetic teacher changes
    # with the seed, so unpaired sds mix task and reading).
    if "frozen" in names:
        print()
        print("| data set | tree | reading | test acc − frozen, mean ± sd over (depth, seed) | "
              "above frozen | train s / frozen |")
        print("|---|---|---|---:|---:|---:|")
        for ds, model in sorted({(k[0], k[1]) for k in cells}):
            for n in names:
                if n == "frozen":
                    continue
                diffs, tratio = [], []
                for key, c in cells.items():
                    if key[:2] != (ds, model) or n not in c or "frozen" not in c:
                        continue
                    base = {r["seed"]: r for r in c["frozen"]}
                    for r in c[n]:
                        if r["seed"] in base:
                            diffs.append(r["test_acc"] - base[r["seed"]]["test_acc"])
                            tratio.append(r["seconds"] / max(1e-9, base[r["seed"]]["seconds"]))
                if diffs:
                    m, sd = _mean_sd(diffs)
                    wins = sum(d > 0 for d in diffs)
                    print(f"| {ds} | {model} | {n} | {m:+.4f} ± {sd:.4f} | {wins}/{len(diffs)} | "
                          f"{sum(tratio) / len(tratio):.1f} |")
    print()
    print("| reading | rows | mean rank (1 = best) | mean test acc | rows best |")
    print("|---|---:|---:|---:|---:|")
    for n in sorted(names, key=lambda n: sum(ranks[n]) / max(1, len(ranks[n]))):
        k = len(ranks[n])
        print(f"| {n} | {k} | {sum(ranks[n]) / max(1, k):.2f} | "
              f"{sum(accs[n]) / max(1, k):.4f} | {ranks[n].count(1)} |")


COMMANDS = {"train": train, "bench": bench, "capacity": capacity, "seeds": seeds, "readings": readings}
BLOCK = re.compile(r"(<!-- tables\.py (\w+) ([^>]*?) -->\n)(.*?)(<!-- end tables\.py -->)", re.S)


def refresh(paths):
    for md in paths:
        base = os.path.dirname(os.path.abspath(md))
        with open(md) as f:
            text = f.read()

        def run(m):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                COMMANDS[m.group(2)]([os.path.join(base, a) for a in m.group(3).split()])
            return m.group(1) + out.getvalue() + m.group(5)

        new = BLOCK.sub(run, text)
        if new != text:
            with open(md, "w") as f:
                f.write(new)
            print(f"tables.py: refreshed {md}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in list(COMMANDS) + ["refresh"]:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    (refresh if sys.argv[1] == "refresh" else COMMANDS[sys.argv[1]])(sys.argv[2:])
