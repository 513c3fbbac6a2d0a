#!/usr/bin/env python3
"""PyTorch peers of one ccr conditional layer, for `ccr-bench --peer` (issue 10).

Times forward + backward (train mode) of the layer written in PyTorch:
  conventional  per-expert Python loop, index_select / index_add_
  strong_autograd  sort the (example, slot) pairs by expert once, gather
                rows contiguously, per-expert addmm on contiguous slices,
                combine by a gather (inverse permutation) instead of a
                scatter; autograd backward.
  strong        the same sort, gather and combine; the expert block is an
                autograd.Function with a hand-written backward, one expert
                per thread (T Python threads, torch and OpenBLAS at one
                thread each, so the GEMMs are single-threaded).
Only the `topk` gate (noisy top-k, docs/GATES.md) over an FFN bank
(relu(x W1 + b1) W2 + b2) is implemented; any other gate prints a record with
"supported": false and no times.  The FLOPs match ccr's: gate 4 d_in E
(clean and noise products), k experts per example, d_in->hidden->d_out.
Importance and smooth-load losses (CV^2) are computed and back-propagated as
in ccr; their weights do not change the cost.

Prints one JSON line on stdout:
  {"supported": true, "torch": ..., "threads": T,
   "seconds_fwdbwd": {"conventional": s, "strong_autograd": s, "strong": s}, ...}
Exit 0 ok, 2 usage error (argparse), 3 torch missing.
"""
import argparse
import ctypes
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gate", required=True)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--d-out", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: torch's own")
    p.add_argument("--repeat", type=int, default=1, help="timed rounds after one warm-up")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    for n in ("experts", "k", "batch", "d_in", "hidden", "d_out", "repeat"):
        if getattr(a, n) < 1:
            p.error("--%s must be positive" % n.replace("_", "-"))
    if a.threads < 0:
        p.error("--threads must be >= 0")
    if a.gate == "topk" and a.k > a.experts:
        p.error("--k must be at most --experts")
    return a


def cv2(v):
    m = v.mean()
    return v.var(unbiased=False) / (m * m + 1e-10)


class Layer:
    """Parameters and inputs shared by both peers."""

    def __init__(self, torch, a):
        g = torch.Generator().manual_seed(a.seed)
        E, d, h, o = a.experts, a.d_in, a.hidden, a.d_out

        def par(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).requires_grad_()

        self.torch = torch
        self.k, self.E = a.k, E
        self.wg = par(d, E, scale=1 / math.sqrt(d))
        self.wn = par(d, E, scale=1 / math.sqrt(d))
        # One tensor per expert (as nn.ModuleList of nn.Linear would hold
        # them): slicing one [E, d, h] tensor would make autograd build a
        # dense [E, d, h] gradient per used expert.
        self.w1 = [par(d, h, scale=math.sqrt(2 / d)) for _ in range(E)]
        self.b1 = [par(h, scale=0.0) for _ in range(E)]
        self.w2 = [par(h, o, scale=1 / math.sqrt(h)) for _ in range(E)]
        self.b2 = [par(o, scale=0.0) for _ in range(E)]
        self.x = torch.randn(a.batch, d, generator=g).requires_grad_()
        self.dy = torch.randn(a.batch, o, generator=g)
        self.d_out = o
        self.params = [self.wg, self.wn, self.x] + self.w1 + self.b1 + self.w2 + self.b2

    def gate(self):
        """Noisy top-k in train mode: (indices [B,k], gates [B,k], aux loss)."""
        torch, k, E = self.torch, self.k, self.E
        x = self.x
        clean = x @ self.wg
        raw = x @ self.wn
        std = torch.nn.functional.softplus(raw) + 1e-2
        noise = torch.randn_like(clean)
        H = clean + noise * std
        kk = min(k + 1, E)
        topv, topi = H.topk(kk, dim=1)
        gates = torch.softmax(topv[:, :k], dim=1)
        idx = topi[:, :k]
        imp = torch.zeros(x.shape[0], E).scatter(1, idx, gates).sum(0)
        aux = 0.01 * cv2(imp)
        if k < E:  # smooth load, thresholds through H (no stop-gradient)
            thr_in = topv[:, k:k + 1]
            thr_out = topv[:, k - 1:k]
            in_top = torch.zeros(x.shape[0], E, dtype=torch.bool).scatter(1, idx, True)
            thr = torch.where(in_top, thr_in, thr_out)
            u = (clean - thr) / std
            load = (0.5 * (1 + torch.erf(u / math.sqrt(2)))).sum(0)
            aux = aux + 0.01 * cv2(load)
        return idx, gates, aux

    def run(self, combine):
        for p in self.params:
            p.grad = None
        idx, gates, aux = self.gate()
        y = combine(idx, gates)
        loss = (y * self.dy).sum() + aux
        loss.backward()


def conventional(L):
    torch = L.torch

    def combine(idx, gates):
        B = L.x.shape[0]
        y = torch.zeros(B, L.d_out)
        for e in range(L.E):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = L.x.index_select(0, rows)
            he = torch.relu(torch.addmm(L.b1[e], xe, L.w1[e]))
            ye = torch.addmm(L.b2[e], he, L.w2[e])
            y.index_add_(0, rows, ye * gates[rows, slot].unsqueeze(1))
        return y
    return combine


def strong_autograd(L):
    torch = L.torch

    def combine(idx, gates):
        B, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)         # sort once
        counts = torch.bincount(flat, minlength=L.E).tolist()
        xs = L.x.index_select(0, order // k)              # contiguous rows per expert
        outs = []
        for e, part in enumerate(torch.split(xs, counts)):
            if counts[e] == 0:
                continue
            he = torch.relu(torch.addmm(L.b1[e], part, L.w1[e]))
            outs.append(torch.addmm(L.b2[e], he, L.w2[e]))
        ys = torch.cat(outs, 0)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        yk = ys.index_select(0, inv).view(B, k, -1)        # gather, no scatter
        return torch.bmm(gates.unsqueeze(1), yk).squeeze(1)
    return combine


def blas_threads(n):
    """Set OpenBLAS's own thread count (torch's generic BLAS path ignores
    torch.set_num_threads).  False when no OpenBLAS is loaded."""
    for line in open("/proc/self/maps"):
        path = line.split()[-1]
        if "libopenblas" in path:
            try:
                ctypes.CDLL(path).openblas_set_num_threads(int(n))
                return True
            except (OSError, AttributeError):
                return False
    return False


def strong(L, threads):
    """Sort once, expert-contiguous rows, one expert per thread with
    single-threaded GEMMs, a hand-written backward of the expert block."""
    torch = L.torch
    pool = ThreadPoolExecutor(max(1, threads))

    class Experts(torch.autograd.Function):
        @staticmethod
        def forward(ctx, xs, counts, *ws):
            E = L.E
            offs = [0]
            for c in counts:
                offs.append(offs[-1] + c)
            ys = xs.new_empty(xs.shape[0], L.d_out)
            hs = [None] * E

            @torch.no_grad()
            def fwd(e):  # pool threads: grad mode is thread-local
                if counts[e] == 0:
                    return
                a, b = offs[e], offs[e + 1]
                h = torch.addmm(ws[E + e], xs[a:b], ws[e]).clamp_min_(0)
                hs[e] = h
                torch.addmm(ws[3 * E + e], h, ws[2 * E + e], out=ys[a:b])
            list(pool.map(fwd, range(E)))
            ctx.offs, ctx.counts, ctx.hs = offs, counts, hs
            ctx.save_for_backward(xs, *ws)
            return ys

        @staticmethod
        def backward(ctx, dys):
            xs, *ws = ctx.saved_tensors
            E, offs, counts, hs = L.E, ctx.offs, ctx.counts, ctx.hs
            dxs = torch.zeros_like(xs)
            g = [None] * (4 * E)

            @torch.no_grad()
            def bwd(e):
                if counts[e] == 0:
                    for j in range(4):
                        g[j * E + e] = torch.zeros_like(ws[j * E + e])
                    return
                a, b = offs[e], offs[e + 1]
                dy, h = dys[a:b], hs[e]
                g[2 * E + e] = h.t().mm(dy)
                g[3 * E + e] = dy.sum(0)
                dh = dy.mm(ws[2 * E + e].t()).mul_(h > 0)
                g[e] = xs[a:b].t().mm(dh)
                g[E + e] = dh.sum(0)
                torch.mm(dh, ws[e].t(), out=dxs[a:b])
            list(pool.map(bwd, range(E)))
            return (dxs, None, *g)

    def combine(idx, gates):
        B, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=L.E).tolist()
        xs = L.x.index_select(0, order // k)
        ys = Experts.apply(xs, counts, *L.w1, *L.b1, *L.w2, *L.b2)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        yk = ys.index_select(0, inv).view(B, k, -1)
        return torch.bmm(gates.unsqueeze(1), yk).squeeze(1)
    return combine


def main():
    a = parse()
    try:
        import torch
    except ImportError as e:
        print("peer_torch.py: PyTorch is not available (%s)" % e, file=sys.stderr)
        return 3
    rec = {"gate": a.gate, "torch": torch.__version__}
    if a.gate != "topk":
        rec.update(supported=False, reason="peer implements only the topk gate with an FFN bank")
        print(json.dumps(rec))
        return 0
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    L = Layer(torch, a)
    T = torch.get_num_threads()
    # (combine, torch threads, OpenBLAS threads): strong runs T experts at
    # once, each with single-threaded GEMMs.
    peers = {"conventional": (conventional(L), T, T),
             "strong_autograd": (strong_autograd(L), T, T),
             "strong": (strong(L, T), 1, 1)}
    times = {n: [] for n in peers}
    for r in range(a.repeat + 1):  # round 0: warm-up
        for n, (comb, tt, bt) in peers.items():
            torch.set_num_threads(tt)
            blas_threads(bt)
            t0 = time.perf_counter()
            L.run(comb)
            dt = time.perf_counter() - t0
            if r > 0:
                times[n].append(dt)
    med = {n: sorted(v)[len(v) // 2] if len(v) % 2 else
           0.5 * (sorted(v)[len(v) // 2 - 1] + sorted(v)[len(v) // 2]) for n, v in times.items()}
    flops = 2.0 * a.batch * (2 * a.d_in * a.experts
                             + a.k * (a.d_in * a.hidden + a.hidden * a.d_out)) * 3
    rec.update(supported=True, threads=T, repeat=a.repeat,
               seconds_fwdbwd=med, flops_fwdbwd_approx=flops)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
