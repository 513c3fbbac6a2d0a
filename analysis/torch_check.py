#!/usr/bin/env python3
"""Independent PyTorch re-computation of a ccr-probe file.

    /usr/bin/python3 analysis/torch_check.py FILE [--quiet] [--rtol R] [--atol A]

ccr-probe (experiments/probe.c) runs one conditional layer forward and
backward on a random batch and writes x, dy, y, aux_loss, the routing table,
the gate's noise draws, every parameter and every gradient.  This script
rebuilds the layer in float64 PyTorch from the file's metadata and
``param.*`` tensors, following docs/GATES.md (written from the specification,
not from the C code), recomputes

  * the route (top-k selection, argmax, capacity drops, sign bits - the
    discrete decisions are made here, in float64, from this script's own
    logits), the route weights, y, aux_loss and its parts, the exported
    Importance and Load vectors,
  * with autograd, the gradients of L = sum(y * dy) + aux_loss with respect
    to x and every parameter (the sign-bit tree's straight-through mode is a
    custom autograd.Function: forward 1[a > 0], backward the identity),

and prints one line per tensor: max abs error, max normalised relative error,
ok/FAIL.  The noise is never drawn here: the file's draws (``noise``,
``noise.primary``, ``noise.secondary``) are used.  Exit status 0 when every
tensor agrees, 1 otherwise (or when the file is unreadable/inconsistent).

Discrete decisions.  The C library decides in float32, this script in
float64, so a choice between two candidates whose scores differ by less
than ``--margin`` (default 1e-5 times max(1, |score|)) is *ambiguous*: where
the file's choice differs from ours but is within the margin of ours (a
valid top-k order, argmax or sign of the float64 scores up to the margin),
we adopt the file's choice, count it as ambiguous and report it; any other
difference in route.ids is a failure.  route.weights are compared on the
non-empty slots only (a dropped slot's weight is not specified).

Tolerance.  ccr computes in float32 (unit roundoff u = 6e-8) with GEMMs of
at most a few dozen terms and reductions over the batch (sums of at most a
few hundred terms, some in double); the expected error of every tensor is a
few u times the magnitude of the terms summed, i.e. ~1e-6 relative to the
tensor's own scale.  An element passes when

    |c - t| <= rtol * |t| + atol * max(1, max|t|)        (t: torch, c: ccr)

with rtol = 1e-4 and atol = 1e-5 (defaults).  rtol gives ~100x headroom over
float32 rounding of well-conditioned values; the absolute floor, scaled by
the tensor's largest entry, covers elements that are the result of
cancellation (a gradient entry summed from terms of size max|t| that nearly
cancel carries an absolute error ~u*max|t|, not a relative one).  The
printed ``rel`` is |c - t| / (|t| + (atol/rtol) * max(1, max|t|)), so a
tensor passes exactly when rel <= rtol.  A tensor that must be zero (the
gradient of a gate in --grad-mode none) has max|t| = 0 and so tolerates
only |c| <= atol.
"""
import math
from fractions import Fraction
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_read  # noqa: E402

torch.set_default_dtype(torch.float64)

RTOL = 1e-4
ATOL = 1e-5
MARGIN = 1e-5


class Inconsistent(Exception):
    """The file does not hold what a probe file must hold."""


# ---------------------------------------------------------------- helpers ----

def cv_squared(v):
    """t2t's CVSquared: population variance / (mean^2 + 1e-10); 0 for n <= 1."""
    v = v.reshape(-1)
    if v.numel() <= 1:
        return v.sum() * 0.0
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return var / (mean * mean + 1e-10)


def softplus(z):
    return torch.nn.functional.softplus(z)


def normal_cdf(z):
    return torch.special.ndtr(z)


def close(a, b, margin):
    return abs(a - b) < margin * max(1.0, abs(a), abs(b))


def desc_order(v):
    """Indices of v by decreasing value, ties to the lower index."""
    v = np.asarray(v, dtype=np.float64)
    return list(np.lexsort((np.arange(v.size), -v)))


def topk_consistent(v, theirs, k, margin):
    """Whether `theirs` (k distinct indices) is a valid top-k of v, in
    decreasing order, up to the margin."""
    if len(theirs) != k or len(set(theirs)) != k or min(theirs) < 0 or max(theirs) >= len(v):
        return False
    for s in range(k - 1):
        a, b = v[theirs[s]], v[theirs[s + 1]]
        if a < b and not close(a, b, margin):
            return False
    lowest = min(v[i] for i in theirs)
    for j in range(len(v)):
        if j not in theirs and v[j] > lowest and not close(v[j], lowest, margin):
            return False
    return True


class Stats:
    def __init__(self):
        self.ambiguous = []   # (what, example, ours, theirs)
        self.mismatch = []    # (what, example, ours, theirs)


def choose_topk(v_row, k, theirs, margin, st, what, b):
    """Our top-k of v_row (decreasing, ties to the lower index); the file's
    choice `theirs` (list or None) is adopted when within the margin."""
    mine = [int(i) for i in desc_order(v_row)[:k]]
    if theirs is None or list(theirs) == mine:
        return mine
    theirs = [int(i) for i in theirs]
    if topk_consistent(v_row, theirs, k, margin):
        st.ambiguous.append((what, b, mine, theirs))
        return theirs
    st.mismatch.append((what, b, mine, theirs))
    return mine


class SteBit(torch.autograd.Function):
    """b = 1[a > 0] forward; db/da = 1 backward (straight-through)."""

    @staticmethod
    def forward(ctx, a):
        return (a > 0).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


# ------------------------------------------------------------------- bank ----

class Bank:
    """Every matrix of the bank evaluated on every example: [B, N, d_out]."""

    def __init__(self, kind, p, prefix):
        self.kind = kind
        if kind == "ffn":
            self.w1, self.b1 = p[prefix + "w1"], p[prefix + "b1"]
            self.w2, self.b2 = p[prefix + "w2"], p[prefix + "b2"]
        else:
            self.w, self.b = p[prefix + "w"], p[prefix + "b"]

    def all(self, x):
        if self.kind == "ffn":
            h = torch.relu(torch.einsum("bi,mih->bmh", x, self.w1) + self.b1.unsqueeze(0))
            return torch.einsum("bmh,mho->bmo", h, self.w2) + self.b2.unsqueeze(0)
        return torch.einsum("bi,mio->bmo", x, self.w) + self.b.unsqueeze(0)


def routed_output(m_all, ids, weights):
    """y_b = sum_s w_{b,s} M_{id_{b,s}}(x_b) over slots with id >= 0."""
    B, slots = ids.shape
    ids_t = torch.as_tensor(np.where(ids >= 0, ids, 0), dtype=torch.long)
    mask = torch.as_tensor((ids >= 0).astype(np.float64))
    picked = torch.gather(m_all, 1, ids_t.unsqueeze(-1).expand(B, slots, m_all.shape[2]))
    return ((weights * mask).unsqueeze(-1) * picked).sum(1)


# ------------------------------------------------------------------ gates ----

def topk_gate(x, wg, wn, noise, k, train, eps, theirs, margin, st, what):
    """Noisy top-k gate (GATES.md `topk`) on the rows of x.  theirs[r] is the
    file's expert order for row r (or None).  Returns a dict of tensors."""
    n_rows, E = x.shape[0], wg.shape[1]
    clean = x @ wg
    if train:
        raw = x @ wn
        std = softplus(raw) + eps
        H = clean + noise * std
    else:
        std = None
        H = clean
    Hn = H.detach().numpy()
    top = np.array([choose_topk(Hn[r], k, theirs[r] if theirs is not None else None, margin,
                                st, what, r) for r in range(n_rows)], dtype=np.int64)
    top = top.reshape(n_rows, k)
    top_t = torch.as_tensor(top)
    gk = torch.softmax(torch.gather(H, 1, top_t), dim=1)        # [n, k], slot order
    G = torch.zeros(n_rows, E).scatter(1, top_t, gk)            # [n, E]
    counts = torch.as_tensor(np.bincount(top.reshape(-1), minlength=E).astype(np.float64))
    if train and k < E:
        in_top = np.zeros((n_rows, E), dtype=bool)
        np.put_along_axis(in_top, top, True, axis=1)
        # thr_out: the k-th largest H (the lowest kept entry), thr_in: the
        # (k+1)-th largest (the highest entry not kept).
        j_out = np.array([top[r][np.argmin(Hn[r][top[r]])] for r in range(n_rows)])
        j_in = np.array([desc_order(np.where(in_top[r], -np.inf, Hn[r]))[0]
                         for r in range(n_rows)])
        thr_out = torch.gather(H, 1, torch.as_tensor(j_out).view(-1, 1))
        thr_in = torch.gather(H, 1, torch.as_tensor(j_in).view(-1, 1))
        thr = torch.where(torch.as_tensor(in_top), thr_in, thr_out)
        P = normal_cdf((clean - thr) / std)
        load = P.sum(0)
    else:
        load = counts
    return {"clean": clean, "H": H, "top": top, "gk": gk, "G": G, "load": load,
            "counts": counts}


def z_term(logits):
    """sum over the rows of logsumexp(row)^2; the z-loss is z_loss times the
    sum of these terms divided by the batch B (ST-MoE eq. 5)."""
    return (torch.logsumexp(logits, dim=1) ** 2).sum()


class Result:
    def __init__(self):
        self.ids = None
        self.weights = None
        self.y = None
        self.aux = None
        self.parts = {}      # loss_importance, loss_load, loss_switch, loss_z
        self.exports = {}    # name -> tensor (no grad needed)


def run_none(cfg, p, x, f, st):
    r = Result()
    B = x.shape[0]
    r.ids = np.zeros((B, 1), dtype=np.int64)
    r.weights = torch.ones(B, 1)
    r.aux = torch.zeros(())
    r.exports["importance"] = torch.tensor([float(B)])
    r.exports["load"] = torch.tensor([float(B)])
    return r


def run_dense(cfg, p, x, f, st):
    r = Result()
    B, E = x.shape[0], cfg["experts"]
    logits = x @ p["gate.w_g"]
    pr = torch.softmax(logits, dim=1)
    r.ids = np.tile(np.arange(E), (B, 1))
    r.weights = pr
    lz = cfg["z_loss"] * z_term(logits) / B if cfg["z_loss"] > 0 else torch.zeros(())
    imp = pr.sum(0)
    li = cfg["w_importance"] * cv_squared(imp)       # Shazeer eqs. 6-7
    r.parts.update(loss_importance=li, loss_z=lz)
    r.aux = li + lz
    r.exports["importance"] = imp
    r.exports["load"] = torch.full((E,), float(B))
    return r


def run_topk(cfg, p, x, f, st):
    r = Result()
    B, k = x.shape[0], cfg["k"]
    train = cfg["train"]
    noise = torch.as_tensor(f["noise"].astype(np.float64)) if train else None
    theirs = [list(row) for row in f["route.ids"]] if "route.ids" in f else None
    g = topk_gate(x, p["gate.w_g"], p["gate.w_noise"], noise, k, train, cfg["noise_eps"],
                  theirs, cfg["margin"], st, "topk")
    r.ids = g["top"]
    r.weights = g["gk"]
    imp = g["G"].sum(0)
    li = cfg["w_importance"] * cv_squared(imp)
    ll = cfg["w_load"] * cv_squared(g["load"])
    lz = cfg["z_loss"] * z_term(g["clean"]) / B if cfg["z_loss"] > 0 else torch.zeros(())
    r.parts.update(loss_importance=li, loss_load=ll, loss_z=lz)
    r.aux = li + ll + lz
    r.exports["importance"] = imp
    r.exports["load"] = g["load"]
    return r


def run_hmoe(cfg, p, x, f, st):
    r = Result()
    # hmoe's groups per example is its own option, k_groups (topk's k counts experts)
    B, E, k, k2, a = x.shape[0], cfg["experts"], cfg["k_groups"], cfg["k2"], cfg["groups"]
    bsz = E // a
    train = cfg["train"]
    file_ids = f.get("route.ids")
    theirs_p = None if file_ids is None else \
        [[int(file_ids[b, q * k2]) // bsz if file_ids[b, q * k2] >= 0 else -1
          for q in range(k)] for b in range(B)]
    npri = torch.as_tensor(f["noise.primary"].astype(np.float64)) if train else None
    nsec = torch.as_tensor(f["noise.secondary"].astype(np.float64)) if train else None
    pri = topk_gate(x, p["gate.primary.w_g"], p["gate.primary.w_noise"], npri, k, train,
                    cfg["noise_eps"], theirs_p, cfg["margin"], st, "hmoe.primary")
    top = pri["top"]                                   # [B, k] groups
    ids = np.full((B, k * k2), -1, dtype=np.int64)
    wts = [[None] * (k * k2) for _ in range(B)]
    imp_rows, load_rows = [], []
    lz_sec = torch.zeros(())
    for i in range(a):
        rows = [b for b in range(B) if i in top[b]]
        pos = {b: list(top[b]).index(i) for b in rows}
        count_i = float(len(rows))
        if not rows:
            imp_rows.append(torch.zeros(bsz))
            load_rows.append(torch.zeros(bsz))
            continue
        ridx = torch.as_tensor(rows)
        xi = x[ridx]
        ni = nsec[ridx, i, :] if train else None
        theirs_s = None if file_ids is None else []
        for b in rows if file_ids is not None else []:
            q0 = pos[b] * k2
            grp = [int(v) // bsz for v in file_ids[b, q0:q0 + k2]]
            theirs_s.append([int(v) % bsz for v in file_ids[b, q0:q0 + k2]]
                            if all(gg == i for gg in grp) else None)
        sec = topk_gate(xi, p["gate.secondary.w_g"][i], p["gate.secondary.w_noise"][i], ni,
                        k2, train, cfg["noise_eps"], theirs_s, cfg["margin"], st,
                        f"hmoe.secondary[{i}]")
        gp = pri["G"][ridx, i]                        # [n_i]
        imp_rows.append((gp.unsqueeze(1) * sec["G"]).sum(0))
        load_rows.append(pri["load"][i] * sec["load"] / (count_i + 1e-10))
        if cfg["z_loss"] > 0:
            lz_sec = lz_sec + z_term(sec["clean"])
        for rr, b in enumerate(rows):
            for q in range(k2):
                s = pos[b] * k2 + q
                ids[b, s] = i * bsz + int(sec["top"][rr, q])
                wts[b][s] = gp[rr] * sec["gk"][rr, q]
    imp = torch.stack(imp_rows)                       # [a, b]
    load = torch.stack(load_rows)
    r.ids = ids
    r.weights = torch.stack([torch.stack(row) for row in wts])
    li = cfg["w_importance"] * cv_squared(imp)
    ll = cfg["w_load"] * cv_squared(load)
    if cfg["z_loss"] > 0:
        lz = cfg["z_loss"] * (z_term(pri["clean"]) + lz_sec) / B
    else:
        lz = torch.zeros(())
    r.parts.update(loss_importance=li, loss_load=ll, loss_z=lz)
    r.aux = li + ll + lz
    r.exports["importance"] = imp
    r.exports["load"] = load
    return r


def switch_capacity(cf, B, E):
    """ceil(cf B / E) clamped to [1, B], with cf read as the shortest decimal
    that gives its double (repr), so 1.1 * 100 / 10 is 11; cf 0: no limit
    (the evaluation default, GATES.md)."""
    if cf == 0:
        return B
    cap = math.ceil(Fraction(repr(float(cf))) * B / E)
    return min(max(cap, 1), B)


def run_switch(cfg, p, x, f, st):
    r = Result()
    B, E = x.shape[0], cfg["experts"]
    logits = x @ p["gate.w_g"]
    pr = torch.softmax(logits, dim=1)
    pn = pr.detach().numpy()
    cap = switch_capacity(cfg["capacity_factor"] if cfg["train"]
                          else cfg["eval_capacity_factor"], B, E)
    file_ids = f.get("route.ids", np.full((B, 1), -1))
    choice = np.zeros(B, dtype=np.int64)
    ids = np.full((B, 1), -1, dtype=np.int64)
    held = np.zeros(E, dtype=np.int64)
    for b in range(B):
        c = desc_order(pn[b])[0]
        fid = int(file_ids[b, 0])
        if fid >= 0 and fid != c:
            if fid < E and close(pn[b][fid], pn[b][c], cfg["margin"]):
                st.ambiguous.append(("switch", b, [c], [fid]))
                c = fid
            else:
                st.mismatch.append(("switch", b, [c], [fid]))
        choice[b] = c
        if held[c] < cap:
            held[c] += 1
            ids[b, 0] = c
    f_frac = torch.as_tensor(np.bincount(choice, minlength=E).astype(np.float64) / B)
    P = pr.mean(0)
    ls = cfg["aux_alpha"] * E * (f_frac * P).sum()
    lz = cfg["z_loss"] * z_term(logits) / B if cfg["z_loss"] > 0 else torch.zeros(())
    r.ids = ids
    r.weights = torch.gather(pr, 1, torch.as_tensor(choice).view(-1, 1))
    r.parts.update(loss_switch=ls, loss_z=lz)
    r.aux = ls + lz
    r.exports["importance"] = pr.sum(0)
    r.exports["load"] = torch.as_tensor(held.astype(np.float64))
    r.dropped = int(B - held.sum())
    return r


def run_signtree(cfg, p, x, f, st, bank):
    """Returns (Result, y): the tree builds its own output (straight-through
    terms need the siblings)."""
    r = Result()
    B, d = x.shape[0], cfg["depth"]
    leaf = cfg["combine"] == "leaf"
    ste = cfg["grad_mode"] == "ste"
    if d > 0:
        if cfg["bits_from"] == "input":
            a = x[:, :d]
        else:
            a = x @ p["tree.w_bits"] + p["tree.c_bits"]
    else:
        a = torch.zeros(B, 0)
    an = a.detach().numpy()
    bits = (an > 0).astype(np.int64)
    # The file's bits, read back from its route, adopted within the margin.
    fid = f.get("route.ids")
    for b in range(B if fid is not None else 0):
        if leaf:
            v = int(fid[b, 0])
            fb = [(v >> (d - 1 - l)) & 1 for l in range(d)] if v >= 0 else None
        else:
            fb = []
            for l in range(1, d + 1):
                n_prev, n_l = int(fid[b, l - 1]), int(fid[b, l])
                fb.append(n_l - 2 * n_prev - 1)
            if any(v not in (0, 1) for v in fb):
                fb = None
        if fb is None:
            continue
        for l in range(d):
            if fb[l] != bits[b, l]:
                if abs(an[b, l]) < cfg["margin"] * max(1.0, abs(an[b, l])):
                    st.ambiguous.append(("signtree bit %d" % (l + 1), b, [int(bits[b, l])],
                                         [fb[l]]))
                    bits[b, l] = fb[l]
                else:
                    st.mismatch.append(("signtree bit %d" % (l + 1), b, [int(bits[b, l])],
                                        [fb[l]]))
    if leaf:
        weights_of_bits = [1 << (d - 1 - l) for l in range(d)]
        leaf_id = (bits * np.array(weights_of_bits, dtype=np.int64)).sum(1) if d else \
            np.zeros(B, dtype=np.int64)
        ids = leaf_id.reshape(B, 1)
    else:
        nodes = np.zeros((B, d + 1), dtype=np.int64)
        for l in range(1, d + 1):
            nodes[:, l] = 2 * nodes[:, l - 1] + 1 + bits[:, l - 1]
        ids = nodes
    r.ids = ids
    r.weights = torch.ones(B, ids.shape[1])
    m_all = bank.all(x)
    y = routed_output(m_all, ids, r.weights)
    if ste and d > 0:
        # y_l = b_l M_right + (1 - b_l) M_left with b_l = SteBit(a_l): the value
        # is the routed output (the chosen child has weight 1), the gradient
        # da_l = dy . (M_right - M_left).  dev = b - stop_gradient(b) is 0 in
        # value and carries db/da = 1.
        bit_t = SteBit.apply(a)
        dev = bit_t - bit_t.detach()
        for l in range(d):
            if leaf:
                right = leaf_id | (1 << (d - 1 - l))
                left = leaf_id & ~(1 << (d - 1 - l))
            else:
                right = 2 * nodes[:, l] + 2
                left = 2 * nodes[:, l] + 1
            bi = torch.arange(B)
            diff = m_all[bi, torch.as_tensor(right)] - m_all[bi, torch.as_tensor(left)]
            y = y + dev[:, l:l + 1] * diff
    r.aux = torch.zeros(())
    last = ids[:, -1]
    n_leaves = 1 << d
    leaf_index = last if leaf else last - (n_leaves - 1)
    cnt = torch.as_tensor(np.bincount(leaf_index, minlength=n_leaves).astype(np.float64))
    r.exports["importance"] = cnt
    r.exports["load"] = cnt
    return r, y


# -------------------------------------------------------------- the check ----

def meta_config(meta):
    def num(key, conv, default=None):
        if key not in meta:
            if default is None:
                raise Inconsistent(f"metadata lacks '{key}'")
            return default
        return conv(meta[key])

    def flag(key):
        v = meta.get(key, "false").lower()
        return v in ("1", "true", "yes")

    cfg = {
        "gate": meta.get("gate"),
        "d_in": num("d_in", int), "d_out": num("d_out", int),
        "hidden": num("hidden", int, 0),
        "experts": num("experts", int, 1), "k": num("k", int, 1),
        "groups": num("groups", int, 1), "k2": num("k2", int, 1),
        "k_groups": num("k_groups", int, 2),
        "depth": num("depth", int, 0),
        "combine": meta.get("combine", "path"),
        "bits_from": meta.get("bits_from", "projection"),
        "grad_mode": meta.get("grad_mode", "none"),
        "capacity_factor": num("capacity_factor", float, 1.25),
        "eval_capacity_factor": num("eval_capacity_factor", float, 0.0),
        "w_importance": num("w_importance", float, 0.1),
        "w_load": num("w_load", float, 0.1),
        "aux_alpha": num("aux_alpha", float, 0.01),
        "z_loss": num("z_loss", float, 0.0),
        "noise_eps": num("noise_eps", float, 0.01),
        "batch": num("batch", int),
        "train": flag("train"),
        "randomize": flag("randomize"),
        "residual": flag("residual"),
    }
    if cfg["gate"] is None:
        raise Inconsistent("metadata lacks 'gate'")
    if cfg["gate"] == "none":
        cfg["experts"] = 1
    cfg["bank"] = meta.get("bank", "linear" if cfg["gate"] == "signtree" else "ffn")
    return cfg


def expected_params(cfg):
    """name -> shape of every parameter the layer must have (GATES.md,
    ccr_cond.h)."""
    g, din, dout, h, E = cfg["gate"], cfg["d_in"], cfg["d_out"], cfg["hidden"], cfg["experts"]
    out = {}
    if g == "signtree":
        d = cfg["depth"]
        n = (1 << d) if cfg["combine"] == "leaf" else (1 << (d + 1)) - 1
        prefix = "tree."
    else:
        n = E
        prefix = "experts."
    if cfg["bank"] == "ffn":
        out[prefix + "w1"] = (n, din, h)
        out[prefix + "b1"] = (n, h)
        out[prefix + "w2"] = (n, h, dout)
        out[prefix + "b2"] = (n, dout)
    else:
        out[prefix + "w"] = (n, din, dout)
        out[prefix + "b"] = (n, dout)
    if g in ("dense", "switch"):
        out["gate.w_g"] = (din, E)
    elif g == "topk":
        out["gate.w_g"] = (din, E)
        out["gate.w_noise"] = (din, E)
    elif g == "hmoe":
        a = cfg["groups"]
        b = E // a
        out["gate.primary.w_g"] = (din, a)
        out["gate.primary.w_noise"] = (din, a)
        out["gate.secondary.w_g"] = (a, din, b)
        out["gate.secondary.w_noise"] = (a, din, b)
    elif g == "signtree" and cfg["bits_from"] == "projection" and cfg["depth"] > 0:
        out["tree.w_bits"] = (din, cfg["depth"])
        out["tree.c_bits"] = (cfg["depth"],)
    return out, prefix


def recompute(cfg, f, exp, prefix):
    """Rebuilds the layer from the file's parameters, x and noise draws and
    runs forward and backward of L = sum(y * dy) + aux_loss.  Returns
    (params, x, y, Result, Stats); params and x carry .grad."""
    params = {n: torch.tensor(f["param." + n].astype(np.float64), requires_grad=True)
              for n in exp}
    x = torch.tensor(f["x"].astype(np.float64), requires_grad=True)
    dy = torch.as_tensor(f["dy"].astype(np.float64))
    st = Stats()
    bank = Bank(cfg["bank"], params, prefix)
    g = cfg["gate"]
    if g == "signtree":
        res, y = run_signtree(cfg, params, x, f, st, bank)
    else:
        runner = {"none": run_none, "dense": run_dense, "topk": run_topk, "hmoe": run_hmoe,
                  "switch": run_switch}.get(g)
        if runner is None:
            raise Inconsistent(f"unknown gate '{g}'")
        res = runner(cfg, params, x, f, st)
        y = routed_output(bank.all(x), res.ids, res.weights)
    if cfg["residual"]:
        y = y + x
    L = (y * dy).sum() + res.aux
    L.backward()
    return params, x, y, res, st


def compare(name, c, t, rtol, atol):
    """Returns (ok, max_abs, rel) of ccr's c against torch's t (numpy)."""
    c = np.asarray(c, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if c.shape != t.shape:
        return False, float("inf"), float("inf"), f"shape {list(c.shape)} != {list(t.shape)}"
    if c.size == 0:
        return True, 0.0, 0.0, ""
    if not np.all(np.isfinite(c)):
        return False, float("inf"), float("inf"), "non-finite values in the file"
    scale = max(1.0, float(np.max(np.abs(t))))
    err = np.abs(c - t)
    rel = err / (np.abs(t) + (atol / rtol) * scale)
    return bool(np.all(rel <= rtol)), float(err.max()), float(rel.max()), ""


def check(path, rtol=RTOL, atol=ATOL, margin=MARGIN):
    tensors, meta = safetensors_read.read(path)
    cfg = meta_config(meta)
    cfg["margin"] = margin
    f = tensors
    lines, failed = [], False

    def report(name, ok, abs_err, rel, note=""):
        nonlocal failed
        failed |= not ok
        lines.append(f"{name:28s} max_abs {abs_err:10.3e}  rel {rel:10.3e}  "
                     f"{'ok' if ok else 'FAIL'}{('  ' + note) if note else ''}")

    for need in ("x", "dy", "y", "aux_loss", "route.ids", "route.weights", "grad.x"):
        if need not in f:
            raise Inconsistent(f"file lacks tensor '{need}'")
    exp, prefix = expected_params(cfg)
    have = {k[len("param."):] for k in f if k.startswith("param.")}
    for n in sorted(set(exp) | have):
        if n not in have:
            report("param." + n, False, float("inf"), float("inf"), "missing from the file")
        elif n not in exp:
            report("param." + n, False, float("inf"), float("inf"), "unexpected parameter")
        elif tuple(f["param." + n].shape) != exp[n]:
            report("param." + n, False, float("inf"), float("inf"),
                   f"shape {list(f['param.' + n].shape)}, expected {list(exp[n])}")
        elif "grad." + n not in f:
            report("grad." + n, False, float("inf"), float("inf"), "missing from the file")
    if failed:
        return lines, failed

    params, x, y, res, st = recompute(cfg, f, exp, prefix)
    g = cfg["gate"]

    # Route.
    fid = f["route.ids"].astype(np.int64)
    if fid.shape != res.ids.shape:
        report("route.ids", False, float("inf"), float("inf"),
               f"shape {list(fid.shape)}, expected {list(res.ids.shape)}")
    else:
        bad = int(np.sum(fid != res.ids))
        note = f"{len(st.ambiguous)} ambiguous choice(s) adopted from the file" \
            if st.ambiguous else ""
        if bad or st.mismatch:
            note = f"{bad} differing slot(s), {len(st.mismatch)} decision(s) beyond the margin"
        report("route.ids", bad == 0 and not st.mismatch, float(bad), 0.0, note)
        for what, b, ours, theirs in st.ambiguous[:10]:
            lines.append(f"  ambiguous {what} example {b}: ours {ours}, file {theirs}")
        for what, b, ours, theirs in st.mismatch[:10]:
            lines.append(f"  MISMATCH {what} example {b}: ours {ours}, file {theirs}")
        keep = (fid >= 0) & (res.ids >= 0)
        ok, ae, rl, note = compare("route.weights", f["route.weights"][keep],
                                   res.weights.detach().numpy()[keep], rtol, atol)
        report("route.weights", ok, ae, rl, note)

    ok, ae, rl, note = compare("y", f["y"], y.detach().numpy(), rtol, atol)
    report("y", ok, ae, rl, note)
    ok, ae, rl, note = compare("aux_loss", f["aux_loss"].reshape(-1)[:1],
                               np.array([float(res.aux)]), rtol, atol)
    report("aux_loss", ok, ae, rl, note)
    if "aux_parts" in f:
        names = ["loss_importance", "loss_load", "loss_switch", "loss_z"]
        for i, n in enumerate(names):
            if n in res.parts:
                ok, ae, rl, note = compare(n, f["aux_parts"][i:i + 1],
                                           np.array([float(res.parts[n])]), rtol, atol)
                report("aux_parts." + n, ok, ae, rl, note)
    for n, t in res.exports.items():
        if n in f:
            ok, ae, rl, note = compare(n, f[n], t.detach().numpy(), rtol, atol)
            report(n, ok, ae, rl, note)
    # The noise draws: present for topk/hmoe; zeros in eval and where unused.
    if g == "topk":
        nz = f.get("noise")
        if nz is None or nz.shape != (cfg["batch"], cfg["experts"]):
            report("noise", False, float("inf"), float("inf"), "missing or wrong shape")
        elif not cfg["train"] and np.any(nz != 0):
            report("noise", False, float(np.abs(nz).max()), float("inf"), "non-zero in eval")
    if g == "hmoe":
        a, bsz = cfg["groups"], cfg["experts"] // cfg["groups"]
        npri, nsec = f.get("noise.primary"), f.get("noise.secondary")
        if npri is None or npri.shape != (cfg["batch"], a):
            report("noise.primary", False, float("inf"), float("inf"), "missing or wrong shape")
        if nsec is None or nsec.shape != (cfg["batch"], a, bsz):
            report("noise.secondary", False, float("inf"), float("inf"),
                   "missing or wrong shape")
        elif npri is not None:
            used = np.zeros((cfg["batch"], a), dtype=bool)
            for b in range(cfg["batch"]):
                for q in range(cfg["k_groups"]):
                    v = int(res.ids[b, q * cfg["k2"]])
                    if v >= 0:
                        used[b, v // bsz] = True
            stray = np.abs(nsec[~used]).max() if np.any(~used) else 0.0
            if stray != 0 or (not cfg["train"] and np.any(npri != 0)):
                report("noise.secondary", False, float(stray), float("inf"),
                       "non-zero draws for unselected groups or in eval")

    # Gradients.
    gx = x.grad if x.grad is not None else torch.zeros_like(x)
    ok, ae, rl, note = compare("grad.x", f["grad.x"], gx.numpy(), rtol, atol)
    report("grad.x", ok, ae, rl, note)
    for n in exp:
        gt = params[n].grad
        gt = gt.numpy() if gt is not None else np.zeros(exp[n])
        ok, ae, rl, note = compare("grad." + n, f["grad." + n], gt, rtol, atol)
        report("grad." + n, ok, ae, rl, note)
    return lines, failed


def main(argv):
    args = argv[1:]
    rtol, atol, margin, quiet = RTOL, ATOL, MARGIN, False
    files = []
    i = 0
    try:
        while i < len(args):
            a = args[i]
            if a in ("-h", "--help"):
                print(__doc__)
                return 0
            if a == "--quiet":
                quiet = True
            elif a in ("--rtol", "--atol", "--margin"):
                v = float(args[i + 1])
                i += 1
                if a == "--rtol":
                    rtol = v
                elif a == "--atol":
                    atol = v
                else:
                    margin = v
            elif a.startswith("--"):
                raise ValueError(f"unknown option '{a}'")
            else:
                files.append(a)
            i += 1
    except (ValueError, IndexError) as e:
        print(f"torch_check: {e}", file=sys.stderr)
        return 2
    if not files:
        print("usage: torch_check.py FILE... [--quiet] [--rtol R] [--atol A] [--margin M]",
              file=sys.stderr)
        return 2
    status = 0
    for path in files:
        try:
            lines, failed = check(path, rtol, atol, margin)
        except (OSError, ValueError, KeyError, Inconsistent) as e:
            print(f"torch_check: {path}: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"== {path}: {'FAIL' if failed else 'ok'}")
        for line in lines:
            if not quiet or "FAIL" in line or "MISMATCH" in line or "ambiguous" in line:
                print("  " + line)
        if failed:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
