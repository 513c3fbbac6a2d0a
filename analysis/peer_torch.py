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
Gates (docs/GATES.md), each over an FFN bank (relu(x W1 + b1) W2 + b2):
  topk    noisy top-k, importance and smooth-load losses (CV^2)
  dense   softmax over all E experts, every expert runs, importance loss
  switch  top-1 of the softmax with capacity ceil(cf B / E) in batch order
          (dropped examples output 0), the alpha E sum f_i P_i loss
  hmoe    noisy top-k over groups, then in each selected group a noisy top-k2
          over its experts (the secondary gate's logits per group over the
          rows routed to it in the strong peers, per group in a Python loop
          in the conventional one); the eq. 13/14 importance and load
          products.
The gate is written once (vectorised PyTorch) and shared; the peers differ
in how the experts run.  signtree (a linear bank, path or leaf routes) is
not implemented: it prints a record with "supported": false and no times.
The FLOPs match ccr's (gate products, k experts per example,
d_in->hidden->d_out).  Loss weights do not change the cost.

Prints one JSON line on stdout:
  {"supported": true, "torch": ..., "threads": T,
   "seconds_fwdbwd": {"conventional": s, "strong_autograd": s, "strong": s}, ...}
With --check, no timing: every peer once from the same seed, and
  {"check": {peer: max relative difference of y and dL/dx to the conventional peer's}}
Exit 0 ok, 1 a --check difference over 1e-5, 2 usage error (argparse), 3 torch missing.
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
    p.add_argument("--groups", type=int, default=2, help="hmoe: groups a")
    p.add_argument("--k-groups", type=int, default=2, help="hmoe: groups per example")
    p.add_argument("--k2", type=int, default=2, help="hmoe: experts per selected group")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="switch")
    p.add_argument("--depth", type=int, default=4, help="signtree: sign bits d")
    p.add_argument("--combine", choices=("path", "leaf"), default="path", help="signtree")
    p.add_argument("--grad-mode", choices=("none", "ste"), default="ste", help="signtree")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--d-out", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: torch's own")
    p.add_argument("--repeat", type=int, default=1, help="timed rounds after one warm-up")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--check", action="store_true",
                   help="no timing: run every peer once from the same seed and compare the "
                        "output and dL/dx with the conventional peer's (exit 1 if they differ)")
    a = p.parse_args()
    for n in ("experts", "k", "groups", "k_groups", "k2", "batch", "d_in", "hidden", "d_out",
              "repeat"):
        if getattr(a, n) < 1:
            p.error("--%s must be positive" % n.replace("_", "-"))
    if a.threads < 0:
        p.error("--threads must be >= 0")
    if a.gate == "topk" and a.k > a.experts:
        p.error("--k must be at most --experts")
    if a.gate == "hmoe" and (a.experts % a.groups or a.k_groups > a.groups
                             or a.k2 > a.experts // a.groups):
        p.error("hmoe needs --groups dividing --experts, --k-groups <= --groups and "
                "--k2 <= experts per group")
    if a.gate == "signtree" and not 0 <= a.depth <= 20:
        p.error("--depth must be in 0..20")
    if a.gate == "switch" and not a.capacity_factor > 0:
        p.error("--capacity-factor must be positive")
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
        self.gate_name, self.a = a.gate, a
        self.k, self.E = a.k, E
        gate_params = []
        if a.gate == "topk":
            self.wg, self.wn = par(d, E, scale=1 / math.sqrt(d)), par(d, E, scale=1 / math.sqrt(d))
            gate_params = [self.wg, self.wn]
        elif a.gate in ("dense", "switch"):
            self.wg = par(d, E, scale=1 / math.sqrt(d))
            gate_params = [self.wg]
            self.k = E if a.gate == "dense" else 1
        elif a.gate == "hmoe":
            ga, gb = a.groups, E // a.groups
            self.wg1 = par(d, ga, scale=1 / math.sqrt(d))
            self.wn1 = par(d, ga, scale=1 / math.sqrt(d))
            # secondary w_g and w_noise of each group packed side by side, as ccr does
            self.w2g = [par(d, 2 * gb, scale=1 / math.sqrt(d)) for _ in range(ga)]
            gate_params = [self.wg1, self.wn1] + self.w2g
            self.k = a.k_groups * a.k2
        elif a.gate == "signtree":
            D = a.depth
            self.E = E = 2 ** (D + 1) - 1 if a.combine == "path" else 2 ** D
            self.k = D + 1 if a.combine == "path" else 1
            self.wbits = par(d, D, scale=1 / math.sqrt(d))
            self.cbits = par(D, scale=0.0)
            gate_params = [self.wbits, self.cbits]
        self.linear = a.gate == "signtree"  # signtree: a linear bank x W + b
        # One tensor per expert (as nn.ModuleList of nn.Linear would hold
        # them): slicing one [E, d, h] tensor would make autograd build a
        # dense [E, d, h] gradient per used expert.
        if self.linear:
            self.w1 = [par(d, o, scale=1 / math.sqrt(d)) for _ in range(E)]
            self.b1 = [par(o, scale=0.0) for _ in range(E)]
            self.w2, self.b2 = [], []
        else:
            self.w1 = [par(d, h, scale=math.sqrt(2 / d)) for _ in range(E)]
            self.b1 = [par(h, scale=0.0) for _ in range(E)]
            self.w2 = [par(h, o, scale=1 / math.sqrt(h)) for _ in range(E)]
            self.b2 = [par(o, scale=0.0) for _ in range(E)]
        self.x = torch.randn(a.batch, d, generator=g).requires_grad_()
        self.dy = torch.randn(a.batch, o, generator=g)
        self.d_out = o
        self.params = gate_params + [self.x] + self.w1 + self.b1 + self.w2 + self.b2
        self.loop_secondary = False  # hmoe: the conventional peer loops over groups (run())
        self.hand = False            # the strong peer: hand-written backward (run())
        self.ste = None                 # signtree: what the straight-through gradient needs

    def expert(self, e, xe):
        """Expert e on rows xe (autograd)."""
        torch = self.torch
        if self.linear:
            return torch.addmm(self.b1[e], xe, self.w1[e])
        return torch.addmm(self.b2[e], torch.relu(torch.addmm(self.b1[e], xe, self.w1[e])),
                           self.w2[e])

    def signtree(self, with_siblings):
        """Sign bits -> matrix ids (docs/GATES.md): path slots n_0..n_d or the
        leaf.  grad-mode ste: with_siblings (the autograd peers) adds each
        level's other child as a slot; the chosen child's weight is 1 + c_l,
        the sibling's -c_l, c_l = (2 b_l - 1)(a_l - a_l.detach()), so the
        values are unchanged and dL/da_l = dy . (M_right(x) - M_left(x))."""
        torch, a, B = self.torch, self.a, self.x.shape[0]
        D = a.depth
        pre = self.x @ self.wbits + self.cbits
        bits = (pre > 0).long()
        if a.combine == "path":
            nodes = [torch.zeros(B, dtype=torch.long)]
            for l in range(D):
                nodes.append(2 * nodes[-1] + 1 + bits[:, l])
            idx = torch.stack(nodes, 1)
            chosen = idx[:, 1:]
            sib = torch.where(chosen % 2 == 1, chosen + 1, chosen - 1)
        else:
            w = 2 ** torch.arange(D - 1, -1, -1)
            idx = (bits * w).sum(1, keepdim=True)
            sib = idx ^ w
        gates = torch.ones(B, idx.shape[1])
        if a.grad_mode == "none" or D == 0:
            return idx, gates, 0.0
        sign = (2 * bits - 1).float()
        if not with_siblings:
            self.ste = (pre, sign, sib)
            return idx, gates, 0.0
        c = sign * (pre - pre.detach())
        if a.combine == "path":
            gates = torch.cat([gates[:, :1], 1 + c], 1)
        else:
            gates = 1 + c.sum(1, keepdim=True)
        return torch.cat([idx, sib], 1), torch.cat([gates, -c], 1), 0.0

    def noisy_topk(self, clean, raw, k):
        """Noisy top-k rows (eqs. 3-5, 8-10): (indices, gates, smooth load [n, E] or None)."""
        torch = self.torch
        std = torch.nn.functional.softplus(raw) + 1e-2
        H = clean + torch.randn_like(clean) * std
        n, E = clean.shape
        topv, topi = H.topk(min(k + 1, E), dim=1)
        gates = torch.softmax(topv[:, :k], dim=1)
        idx = topi[:, :k]
        load = None
        if k < E:  # smooth load, thresholds through H (no stop-gradient)
            in_top = torch.zeros(n, E, dtype=torch.bool).scatter(1, idx, True)
            thr = torch.where(in_top, topv[:, k:k + 1], topv[:, k - 1:k])
            load = 0.5 * (1 + torch.erf((clean - thr) / std / math.sqrt(2)))
        return idx, gates, load

    def gate(self):
        """Train mode: (indices [B,k] with -1 = dropped, gates [B,k], aux loss)."""
        torch, x, E, B = self.torch, self.x, self.E, self.x.shape[0]
        if self.gate_name == "topk":
            idx, gates, load = self.noisy_topk(x @ self.wg, x @ self.wn, self.k)
            imp = torch.zeros(B, E).scatter(1, idx, gates).sum(0)
            aux = 0.01 * cv2(imp)
            if load is not None:
                aux = aux + 0.01 * cv2(load.sum(0))
            return idx, gates, aux
        if self.gate_name == "dense":
            p = torch.softmax(x @ self.wg, dim=1)
            return torch.arange(E).expand(B, E), p, 0.01 * cv2(p.sum(0))
        if self.gate_name == "switch":
            p = torch.softmax(x @ self.wg, dim=1)
            top = p.argmax(dim=1)
            onehot = torch.nn.functional.one_hot(top, E)
            cap = max(1, min(B, math.ceil(self.a.capacity_factor * B / E)))
            pos = (onehot.cumsum(0) * onehot).sum(1) - 1     # place in its expert, batch order
            keep = pos < cap
            idx = torch.where(keep, top, torch.full_like(top, -1)).unsqueeze(1)
            gates = (p.gather(1, top.unsqueeze(1)).squeeze(1) * keep).unsqueeze(1)
            aux = 0.01 * E * (onehot.float().mean(0) * p.mean(0)).sum()
            return idx, gates, aux
        if self.gate_name == "signtree":
            return self.signtree(not self.hand)
        # hmoe
        a = self.a
        ga, gb, k1, k2 = a.groups, E // a.groups, a.k_groups, a.k2
        i1, g1, load1 = self.noisy_topk(x @ self.wg1, x @ self.wn1, k1)
        grp = i1.reshape(-1)                                # pair (example, p) -> group
        rows = torch.arange(B).repeat_interleave(k1)
        if self.loop_secondary:
            logits = x.new_zeros(B * k1, 2 * gb)
            for gi in range(ga):
                sel = (grp == gi).nonzero(as_tuple=True)[0]
                if sel.numel():
                    logits = logits.index_copy(0, sel, x.index_select(0, rows[sel]) @ self.w2g[gi])
        else:  # sort the pairs by group once, one GEMM per group, gather back
            order = torch.argsort(grp, stable=True)
            counts = torch.bincount(grp, minlength=ga).tolist()
            xs = x.index_select(0, rows[order])
            parts = [xp @ self.w2g[gi] for gi, xp in enumerate(torch.split(xs, counts))
                     if counts[gi]]
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel())
            logits = torch.cat(parts, 0).index_select(0, inv)
        i2, g2, load2 = self.noisy_topk(logits[:, :gb], logits[:, gb:], k2)
        idx = (grp.unsqueeze(1) * gb + i2).view(B, k1 * k2)
        gates = (g1.reshape(-1, 1) * g2).view(B, k1 * k2)
        imp = torch.zeros(B, E).scatter(1, idx, gates).sum(0)
        lp = load1.sum(0) if load1 is not None else torch.bincount(grp, minlength=ga).float()
        l2 = load2 if load2 is not None else torch.zeros(B * k1, gb).scatter(1, i2, 1.0)
        l2g = torch.zeros(ga, gb).index_add(0, grp, l2)
        cnt = torch.bincount(grp, minlength=ga).float()
        loadh = lp.unsqueeze(1) * l2g / (cnt.unsqueeze(1) + 1e-10)
        return idx, gates, 0.1 * cv2(imp) + 0.1 * cv2(loadh.reshape(-1))

    def run(self, combine, loop_secondary=False, hand=False):
        for p in self.params:
            p.grad = None
        self.loop_secondary, self.hand = loop_secondary, hand
        idx, gates, aux = self.gate()
        y = combine(idx, gates)
        loss = (y * self.dy).sum() + aux
        loss.backward()
        return y.detach(), self.x.grad.clone()


def conventional(L):
    torch = L.torch

    def combine(idx, gates):
        B = L.x.shape[0]
        y = torch.zeros(B, L.d_out)
        for e in range(L.E):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            ye = L.expert(e, L.x.index_select(0, rows))
            y.index_add_(0, rows, ye * gates[rows, slot].unsqueeze(1))
        return y
    return combine


def strong_autograd(L):
    torch = L.torch

    def combine(idx, gates):
        B, k = idx.shape
        order, counts, xs = sort_pairs(L, idx)           # sort once, rows per expert
        outs = []
        for e, part in enumerate(torch.split(xs, counts[:L.E])):
            if counts[e] == 0:
                continue
            outs.append(L.expert(e, part))
        return gather_combine(L, order, counts, torch.cat(outs, 0), gates)
    return combine


def sort_pairs(L, idx):
    """The (example, slot) pairs sorted by expert, stably; dropped pairs
    (-1) last, in a bucket of their own that no expert computes."""
    torch = L.torch
    B, k = idx.shape
    flat = torch.where(idx < 0, torch.full_like(idx, L.E), idx).reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=L.E + 1).tolist()
    xs = L.x.index_select(0, order[:order.numel() - counts[L.E]] // k)
    return order, counts, xs


def gather_combine(L, order, counts, ys, gates):
    """y_b = sum_s gates[b, s] y_(b, s): the inverse permutation as a gather
    (dropped pairs read a zero row), then one batched product."""
    torch = L.torch
    B, k = gates.shape
    ys = torch.cat([ys, ys.new_zeros(1, ys.shape[1])], 0)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel()).clamp_max_(ys.shape[0] - 1)
    yk = ys.index_select(0, inv).view(B, k, -1)            # gather, no scatter
    L.last_yk = yk
    return torch.bmm(gates.unsqueeze(1), yk).squeeze(1)


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
                if L.linear:
                    torch.addmm(ws[E + e], xs[a:b], ws[e], out=ys[a:b])
                    return
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
            g = [None] * len(ws)

            @torch.no_grad()
            def bwd(e):
                if counts[e] == 0:
                    for j in range(len(ws) // E):
                        g[j * E + e] = torch.zeros_like(ws[j * E + e])
                    return
                a, b = offs[e], offs[e + 1]
                if L.linear:
                    g[e] = xs[a:b].t().mm(dys[a:b])
                    g[E + e] = dys[a:b].sum(0)
                    torch.mm(dys[a:b], ws[e].t(), out=dxs[a:b])
                    return
                dy, h = dys[a:b], hs[e]
                g[2 * E + e] = h.t().mm(dy)
                g[3 * E + e] = dy.sum(0)
                dh = dy.mm(ws[2 * E + e].t()).mul_(h > 0)
                g[e] = xs[a:b].t().mm(dh)
                g[E + e] = dh.sum(0)
                torch.mm(dh, ws[e].t(), out=dxs[a:b])
            list(pool.map(bwd, range(E)))
            return (dxs, None, *g)

    class SteBits(torch.autograd.Function):
        """signtree, grad-mode ste: adds nothing forward; backward gives
        dL/da_l = (2 b_l - 1) dy . (M_chosen(x) - M_sibling(x)), the chosen
        children's outputs from the forward, the siblings evaluated here
        (sorted by matrix, one single-threaded GEMM per matrix per thread)."""
        @staticmethod
        def forward(ctx, pre, sign, sib, yk):
            ctx.sign, ctx.sib, ctx.yk = sign, sib, yk
            return pre.new_zeros(pre.shape[0], L.d_out)

        @staticmethod
        def backward(ctx, dy):
            sign, sib, yk = ctx.sign, ctx.sib, ctx.yk
            B, D = sib.shape
            with torch.no_grad():
                chosen = yk[:, 1:] if L.a.combine == "path" else yk.expand(B, D, L.d_out)
                dot_c = torch.bmm(chosen, dy.unsqueeze(2)).squeeze(2)
                flat = sib.reshape(-1)
                order = torch.argsort(flat, stable=True)
                counts = torch.bincount(flat, minlength=L.E).tolist()
                offs = [0]
                for c in counts:
                    offs.append(offs[-1] + c)
                rows = order // D
                xs, dys = L.x.detach().index_select(0, rows), dy.index_select(0, rows)
                dots = xs.new_empty(flat.numel())

                def ev(e):
                    a, b = offs[e], offs[e + 1]
                    if a < b:
                        m = torch.addmm(L.b1[e].detach(), xs[a:b], L.w1[e].detach())
                        dots[a:b] = (m * dys[a:b]).sum(1)
                list(pool.map(ev, range(L.E)))
                dot_s = torch.empty_like(dots)
                dot_s[order] = dots
                return sign * (dot_c - dot_s.view(B, D)), None, None, None

    def combine(idx, gates):
        order, counts, xs = sort_pairs(L, idx)
        ys = Experts.apply(xs, counts[:L.E], *L.w1, *L.b1, *L.w2, *L.b2)
        y = gather_combine(L, order, counts, ys, gates)
        if L.ste is not None:
            pre, sign, sib = L.ste
            y = y + SteBits.apply(pre, sign, sib, L.last_yk.detach())
            L.ste = None
        return y
    return combine


def main():
    a = parse()
    try:
        import torch
    except ImportError as e:
        print("peer_torch.py: PyTorch is not available (%s)" % e, file=sys.stderr)
        return 3
    rec = {"gate": a.gate, "torch": torch.__version__}
    if a.gate not in ("topk", "dense", "switch", "hmoe", "signtree"):
        rec.update(supported=False, reason="no peer for this gate")
        print(json.dumps(rec))
        return 0
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    L = Layer(torch, a)
    T = torch.get_num_threads()
    # (combine, torch threads, OpenBLAS threads): strong runs T experts at
    # once, each with single-threaded GEMMs.
    # The conventional peer also loops over hmoe's groups for the secondary gate.
    peers = {"conventional": (conventional(L), T, T, True, False),
             "strong_autograd": (strong_autograd(L), T, T, False, False),
             "strong": (strong(L, T), 1, 1, False, True)}
    if a.check:
        ref, err = None, {}
        for n, (comb, tt, bt, loop, hand) in peers.items():
            torch.manual_seed(a.seed)
            y, dx = L.run(comb, loop, hand)
            if ref is None:
                ref = (y, dx)
            err[n] = max(float((u - v).abs().max() / (v.abs().max() + 1e-30))
                         for u, v in zip((y, dx), ref))
        rec.update(supported=True, check=err)
        print(json.dumps(rec))
        return 0 if max(err.values()) < 1e-5 else 1
    times = {n: [] for n in peers}
    for r in range(a.repeat + 1):  # round 0: warm-up
        for n, (comb, tt, bt, loop, hand) in peers.items():
            torch.set_num_threads(tt)
            blas_threads(bt)
            t0 = time.perf_counter()
            L.run(comb, loop, hand)
            dt = time.perf_counter() - t0
            if r > 0:
                times[n].append(dt)
    med = {n: sorted(v)[len(v) // 2] if len(v) % 2 else
           0.5 * (sorted(v)[len(v) // 2 - 1] + sorted(v)[len(v) // 2]) for n, v in times.items()}
    gate = {"topk": 2 * a.d_in * a.experts, "dense": a.d_in * a.experts,
            "switch": a.d_in * a.experts,
            "hmoe": 2 * a.d_in * a.groups + a.k_groups * 2 * a.d_in * (a.experts // a.groups),
            "signtree": a.d_in * a.depth}
    per = a.d_in * a.d_out if L.linear else a.d_in * a.hidden + a.hidden * a.d_out
    flops = 2.0 * a.batch * (gate[a.gate] + L.k * per) * 3
    rec.update(supported=True, threads=T, repeat=a.repeat,
               seconds_fwdbwd=med, flops_fwdbwd_approx=flops)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
