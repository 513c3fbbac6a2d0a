#!/usr/bin/env python3
"""JSON Lines results -> PNG plots (matplotlib, Agg backend; no display needed).

    /usr/bin/python3 analysis/plots.py capacity FILE.jsonl [--out capacity.png]
    /usr/bin/python3 analysis/plots.py constwork FILE.jsonl [FILE.jsonl ...] [--out F.png]
    /usr/bin/python3 analysis/plots.py lmcurve FILE.jsonl [FILE.jsonl ...] [--out F.png]
    /usr/bin/python3 analysis/plots.py xy FILE.jsonl [FILE.jsonl ...] --x FIELD --y FIELD
            [--group FIELD[,FIELD]] [--where FIELD=VALUE ...] [--logx] [--logy]
            [--xlabel TEXT] [--ylabel TEXT] [--title TEXT] [--out plot.png]

`capacity` draws the ccr-capacity records: parameters against seconds per
example on log-log axes, forward (eval) and forward + backward (train) side
by side, one line per gate with the dense baseline (gate `none`, its hidden
width swept) dashed; each line's end points are labelled with their knob.

`constwork` draws ccr-bench records of issue 10's target 2 (constant work,
growing capacity): parameters against µs per example, one panel per batch
size, forward + backward solid and the full training step dashed, one colour
per layer (hmoe, the leaf tree, ...); each point's knob (E or depth) labelled.

`lmcurve` draws ccr-lm records with per-epoch perplexities (several
epochs): validation perplexity after each pass, one line per model (left),
and the final test perplexity against parameters excluding embedding and
softmax, log x (right), each point labelled with its model.

`xy` is the generic form for the other drivers: one line per distinct value
of the --group field(s) (records in file order, sorted by x), optional
filters --where field=value (compared as strings), log axes on request.

Default output: FILE with .png in place of .jsonl.  Exit 2 on bad arguments,
1 when a field is missing from every record.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

STYLE = {  # series -> (label, colour, marker, line style)
    "none": ("dense baseline (none, hidden swept)", "black", "s", "--"),
    "topk": ("topk (k experts)", "tab:blue", "o", "-"),
    "hmoe": ("hmoe (k/k2 groups × k2)", "tab:orange", "^", "-"),
    "switch": ("switch (top-1, capacity)", "tab:green", "v", "-"),
    "signtree-path": ("signtree path (d+1 nodes)", "tab:red", "D", "-"),
    "signtree-leaf": ("signtree leaf (1 of 2^d)", "tab:purple", "P", "-"),
    "dense": ("dense gate (all E run)", "tab:gray", "x", ":"),
    # ccr-bench only: the tree without the sign bits' straight-through gradient
    "signtree-path-none": ("signtree path, grad-mode none", "tab:pink", "D", "-"),
    "signtree-leaf-none": ("signtree leaf, grad-mode none", "tab:brown", "P", "-"),
}
KNOB = {"hidden": "h", "experts": "E", "depth": "d"}


def load(paths):
    recs = []
    for p in paths:
        with open(p) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs


def default_out(path):
    stem, _ = os.path.splitext(path)
    return stem + ".png"


def save(fig, a):
    """Writes the figure to --out (default: the first file with .png)."""
    fig.tight_layout()
    out = a.out or default_out(a.files[0])
    fig.savefig(out, dpi=110)
    print(f"plots.py: wrote {out}", file=sys.stderr)
    return 0


def capacity(a):
    recs = load(a.files)
    if not recs or "series" not in recs[0]:
        sys.exit(f"plots.py: {a.files[0]}: not ccr-capacity records")
    r0 = recs[0]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=False)
    panels = [("fwd_seconds_per_example", "forward (eval), batch {b}"),
              ("fwdbwd_seconds_per_example", "forward + backward (train), batch {b}")]
    order = [s for s in STYLE if any(r["series"] == s for r in recs)]
    for ax, (field, title) in zip(axes, panels):
        for s in order:
            pts = sorted((r for r in recs if r["series"] == s), key=lambda r: r["params"])
            label, colour, marker, ls = STYLE[s]
            xs = [r["params"] for r in pts]
            ys = [r[field] * 1e6 for r in pts]
            ax.plot(xs, ys, ls, color=colour, marker=marker, ms=4, label=label)
            for r, x, y in ((pts[0], xs[0], ys[0]), (pts[-1], xs[-1], ys[-1])):
                ax.annotate(f"{KNOB.get(r['knob'], r['knob'])}={r['knob_value']}", (x, y),
                            textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=colour)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters of the layer")
        ax.set_ylabel("µs per example")
        ax.set_title(title.format(b=r0.get("batch", "?")))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"ccr-capacity: d={r0.get('d_in')}, FFN expert hidden "
                 f"{next((r['expert_hidden'] for r in recs if r['series'] == 'topk'), '?')}, "
                 f"{r0.get('machine', '')}, OpenBLAS {r0.get('blas_core', '')} "
                 f"{r0.get('blas_threads', '')} thr, git {r0.get('git', '')}", fontsize=9)
    return save(fig, a)


def bench_series(r):
    if r.get("gate") == "signtree":
        none = "-none" if r.get("grad_mode") == "none" else ""
        return f"signtree-{r.get('combine', 'leaf')}{none}"
    return r.get("gate", "?")


def constwork(a):
    recs = [r for r in load(a.files) if r.get("driver") == "ccr-bench"]
    if not recs:
        print(f"plots.py: {a.files[0]}: no ccr-bench records", file=sys.stderr)
        return 1
    batches = sorted({r["batch"] for r in recs})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.8), squeeze=False)
    for ax, b in zip(axes[0], batches):
        here = [r for r in recs if r["batch"] == b]
        for s in [s for s in STYLE if any(bench_series(r) == s for r in here)]:
            pts = sorted((r for r in here if bench_series(r) == s), key=lambda r: r["params"])
            label, colour, marker, _ = STYLE[s]
            xs = [r["params"] for r in pts]
            for field, ls, what in (("seconds_fwdbwd", "-", "fwd+bwd"),
                                    ("seconds_step", "--", "step")):
                ys = [r[field] / b * 1e6 for r in pts]
                ax.plot(xs, ys, ls, color=colour, marker=marker, ms=4,
                        label=f"{label.split(' (')[0]} {what}")
            for r, x in zip(pts, xs):
                knob = f"d={r['depth']}" if s.startswith("signtree") else f"E={r['experts']}"
                ax.annotate(knob, (x, r["seconds_fwdbwd"] / b * 1e6), textcoords="offset points",
                            xytext=(3, -9), fontsize=6, color=colour)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters of the layer")
        ax.set_ylabel("µs per example")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    r0 = recs[0]
    fig.suptitle(f"ccr-bench, constant work per example: {r0.get('machine', '')}, OpenBLAS "
                 f"{r0.get('blas_core', '')} {r0.get('blas_threads', '')} thr, git "
                 f"{r0.get('git', '')}", fontsize=9)
    return save(fig, a)


def lmcurve(a):
    recs = [r for r in load(a.files) if r.get("valid_ppl_epochs")]
    if not recs:
        print("plots.py: no ccr-lm record with valid_ppl_epochs", file=sys.stderr)
        return 1
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in recs:
        v = r["valid_ppl_epochs"]
        ax.plot(range(1, len(v) + 1), v, "-o", ms=4,
                label=f"{r['model']} ({r['params'] / 1e6:.2f} M, {len(v)} ep)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch (passes over the training split)")
    ax.set_ylabel("validation perplexity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    recs.sort(key=lambda r: r["params"])
    # points, not a line: the records may differ in epochs (labelled)
    bx.plot([r["params"] for r in recs], [r["test_ppl"] for r in recs], "o", ms=5)
    for r in recs:
        bx.annotate(f"{r['model']} ({r['epochs']} ep)", (r["params"], r["test_ppl"]),
                    fontsize=7, textcoords="offset points", xytext=(4, 4))
    bx.set_xscale("log")
    bx.set_xlabel("parameters excl. embedding and softmax")
    bx.set_ylabel("test perplexity after the last epoch")
    bx.grid(True, which="both", alpha=0.3)
    r0 = recs[0]
    fig.suptitle(f"ccr-lm, {r0.get('n_train', '?')} training tokens, vocab {r0.get('vocab', '?')}, "
                 f"d {r0.get('d', '?')}; {r0.get('machine', '')}", fontsize=9)
    return save(fig, a)


def xy(a):
    recs = load(a.files)
    for w in a.where:
        if "=" not in w:
            print(f"plots.py: --where needs FIELD=VALUE, got '{w}'", file=sys.stderr)
            sys.exit(2)
        k, v = w.split("=", 1)
        recs = [r for r in recs if str(r.get(k)) == v]
    recs = [r for r in recs if a.x in r and a.y in r]
    if not recs:
        print(f"plots.py: no record has both '{a.x}' and '{a.y}'", file=sys.stderr)
        return 1
    keys = [g for g in (a.group or "").split(",") if g]
    groups = {}
    for r in recs:
        groups.setdefault(tuple(str(r.get(k)) for k in keys), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 5))
    for g, pts in groups.items():
        pts.sort(key=lambda r: r[a.x])
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, g)) or None
        ax.plot([r[a.x] for r in pts], [r[a.y] for r in pts], "-o", ms=4, label=label)
    if a.logx:
        ax.set_xscale("log")
    if a.logy:
        ax.set_yscale("log")
    ax.set_xlabel(a.xlabel or a.x)
    ax.set_ylabel(a.ylabel or a.y)
    if a.title:
        ax.set_title(a.title)
    ax.grid(True, which="both", alpha=0.3)
    if keys:
        ax.legend(fontsize=8)
    return save(fig, a)


def main(argv):
    p = argparse.ArgumentParser(description="JSONL results -> PNG plots")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capacity", help="ccr-capacity: params vs time/example")
    c.add_argument("files", nargs="+")
    c.add_argument("--out")
    w = sub.add_parser("constwork", help="ccr-bench: params vs time/example per batch")
    w.add_argument("files", nargs="+")
    w.add_argument("--out")
    m = sub.add_parser("lmcurve", help="ccr-lm: validation perplexity per epoch, test vs params")
    m.add_argument("files", nargs="+")
    m.add_argument("--out")
    x = sub.add_parser("xy", help="any field against any field")
    x.add_argument("files", nargs="+")
    x.add_argument("--x", required=True)
    x.add_argument("--y", required=True)
    x.add_argument("--group")
    x.add_argument("--where", action="append", default=[])
    x.add_argument("--logx", action="store_true")
    x.add_argument("--logy", action="store_true")
    x.add_argument("--xlabel")
    x.add_argument("--ylabel")
    x.add_argument("--title")
    x.add_argument("--out")
    a = p.parse_args(argv[1:])
    return {"capacity": capacity, "constwork": constwork, "lmcurve": lmcurve,
            "xy": xy}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
