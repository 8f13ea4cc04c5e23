"""Verification metrics: ROC, TAR@FAR, EER, AUC, k-fold accuracy and the IvS evaluation.

Conventions (methods.md §6). A pair is *accepted* at threshold t when its score s ≥ t.

    TAR(t) = #{genuine s ≥ t} / n_gen          FAR(t) = #{impostor s ≥ t} / n_imp

The ROC is exact: one vertex per distinct score (ties move FAR and TAR together, a diagonal
step), no threshold grid. All functions accept 1-D torch tensors or numpy arrays and compute in
float64 on CPU.

Rules stated once here:
- **TAR@FAR** = the largest TAR among ROC vertices whose FAR ≤ `far`. Equivalently, with v the
  (⌊far·n_imp⌋+1)-th largest impostor score, TAR@FAR = #{genuine s > v} / n_gen. It is NaN
  ("n/a") when n_imp < 1/far: below that the only admissible threshold rejects every impostor
  and the figure says nothing about the FAR asked for.
- **EER** = the point where the ROC polyline (vertices joined by straight segments) crosses the
  line FAR = 1 − TAR; the value is that FAR. The polyline is monotone, so the crossing is unique.
- **AUC** = trapezoidal area under the exact ROC = P(s_gen > s_imp) + ½·P(s_gen = s_imp).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "auc",
    "eer",
    "far_key",
    "ivs_verification",
    "kfold_accuracy",
    "min_impostors",
    "roc",
    "tar_at_far",
]


def far_key(far: float) -> str:
    """Result-column name of TAR at `far`: `far_key(1e-3) == "tar@1e-3"`, `far_key(0.1) ==
    "tar@1e-1"`, `far_key(0.05) == "tar@5e-2"` (shortest mantissa, integer exponent)."""
    if not 0.0 < far <= 1.0:
        raise ValueError(f"far must be in (0, 1]; got {far!r}")
    mantissa, exponent = f"{far:e}".split("e")
    return f"tar@{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def min_impostors(far: float) -> int:
    """Fewest impostor pairs for which TAR@`far` is defined: ⌈1/far⌉ (with a relative slack of
    1e-9 so that 1/1e-6 = 999999.9999… counts as 10⁶)."""
    return math.ceil(1.0 / far * (1.0 - 1e-9))


def _as_inputs(scores, is_genuine) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float64 scores (n,), bool is_genuine (n,))."""
    s = _to_numpy(scores).astype(np.float64, copy=False)
    g = _to_numpy(is_genuine)
    if s.ndim != 1 or g.ndim != 1:
        raise ValueError(f"scores and is_genuine must be 1-D; got shapes {s.shape} and {g.shape}")
    if s.shape != g.shape:
        raise ValueError(f"length mismatch: {s.shape[0]} scores but {g.shape[0]} is_genuine flags")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN value(s)")
    if g.dtype != np.bool_:
        if not np.isin(g, (0, 1)).all():
            raise ValueError("is_genuine must be boolean or 0/1")
        g = g.astype(bool)
    if not g.any():
        raise ValueError("no genuine pair (is_genuine is all False)")
    if g.all():
        raise ValueError("no impostor pair (is_genuine is all True)")
    return s, g


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _roc_counts(s: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (#impostors ≥ t, #genuine ≥ t) at every distinct score t, descending."""
    order = np.argsort(-s, kind="stable")
    s, g = s[order], g[order]
    # last index of each run of equal scores: a tie moves both counts in one step
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(g)[last]
    fp = (last + 1) - tp
    return fp, tp, s[last]


def roc(scores, is_genuine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC: `(far, tar, thresholds)`, each (m+1,) for m distinct scores.

    Vertex 0 is (0, 0) at threshold +inf; vertex k ≥ 1 is (FAR(t_k), TAR(t_k)) for the k-th
    largest distinct score t_k. Same as sklearn's `roc_curve(..., drop_intermediate=False)`.
    """
    s, g = _as_inputs(scores, is_genuine)
    fp, tp, thr = _roc_counts(s, g)
    n_gen, n_imp = int(g.sum()), int((~g).sum())
    far = np.r_[0.0, fp / n_imp]
    tar = np.r_[0.0, tp / n_gen]
    return far, tar, np.r_[np.inf, thr]


def tar_at_far(scores, is_genuine, far: float) -> float:
    """Largest TAR whose FAR ≤ `far` (module docstring); NaN when n_imp < ⌈1/far⌉."""
    if not 0.0 < far <= 1.0:
        raise ValueError(f"far must be in (0, 1]; got {far!r}")
    s, g = _as_inputs(scores, is_genuine)
    n_imp = int((~g).sum())
    if n_imp < min_impostors(far):
        return math.nan
    imp = np.sort(s[~g])[::-1]
    allowed = math.floor(far * n_imp * (1.0 + 1e-12))
    if allowed >= n_imp:
        return 1.0
    return float((s[g] > imp[allowed]).mean())


def _eer_from_roc(far: np.ndarray, tar: np.ndarray) -> float:
    """Crossing of the ROC polyline with FAR = 1 − TAR (module docstring)."""
    frr = 1.0 - tar
    # d = FAR − FRR rises from −1 at (0,0) to +1 at (1,1); find the first vertex with d ≥ 0
    d = far - frr
    k = int(np.argmax(d >= 0))
    if d[k] == 0 or k == 0:
        return float(far[k])
    # linear interpolation on segment (k−1, k), where d changes sign
    w = -d[k - 1] / (d[k] - d[k - 1])
    return float(far[k - 1] + w * (far[k] - far[k - 1]))


def eer(scores, is_genuine) -> float:
    """Equal error rate: FAR at the crossing of the exact ROC with FAR = 1 − TAR."""
    far, tar, _ = roc(scores, is_genuine)
    return _eer_from_roc(far, tar)


def _auc_from_roc(far: np.ndarray, tar: np.ndarray) -> float:
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def auc(scores, is_genuine) -> float:
    """Area under the exact ROC (trapezoids) = P(gen > imp) + ½·P(gen = imp)."""
    far, tar, _ = roc(scores, is_genuine)
    return _auc_from_roc(far, tar)


def _best_threshold(s: np.ndarray, g: np.ndarray) -> float:
    """Threshold maximising accuracy on (s, g): the midpoint between the last accepted and the
    first rejected distinct score (±inf outside), highest threshold on ties of accuracy."""
    fp, tp, thr = _roc_counts(s, g)
    n_imp = int((~g).sum())
    # candidate k = accept the k largest distinct scores (k = 0: accept nothing)
    correct = np.r_[n_imp, tp + (n_imp - fp)]
    k = int(np.argmax(correct))
    upper = thr[k - 1] if k > 0 else np.inf
    lower = thr[k] if k < thr.size else -np.inf
    if np.isinf(upper) or np.isinf(lower):
        return float(lower if np.isinf(upper) else upper)
    return float((upper + lower) / 2.0)


def kfold_accuracy(scores, is_genuine, folds: int = 10) -> tuple[float, float]:
    """LFW-style accuracy: `(mean, std)` over `folds` contiguous folds.

    For fold k the threshold maximising accuracy on the other folds (`_best_threshold`) is
    applied to fold k: acc_k = mean([s ≥ t_k] == is_genuine) over fold k. std is the population
    standard deviation (ddof = 0) of the acc_k. Folds are `np.array_split` of the given order:
    shuffle or interleave pairs beforehand if the order is not random. A training part without
    genuine or impostor pairs raises ValueError.
    """
    s, g = _as_inputs(scores, is_genuine)
    if not isinstance(folds, int) or folds < 2 or folds > s.size:
        raise ValueError(f"folds must be an int in [2, n_pairs={s.size}]; got {folds!r}")
    bounds = np.array_split(np.arange(s.size), folds)
    accs = []
    for test in bounds:
        train = np.ones(s.size, dtype=bool)
        train[test] = False
        s_tr, g_tr = _as_inputs(s[train], g[train])
        t = _best_threshold(s_tr, g_tr)
        accs.append(float(((s[test] >= t) == g[test]).mean()))
    return float(np.mean(accs)), float(np.std(accs))


# --- IvS evaluation at scale --------------------------------------------------------------------


def ivs_verification(
    id_emb: torch.Tensor,
    spot_emb: torch.Tensor,
    fars: Sequence[float],
    *,
    block: int = 1024,
    normalize: bool = True,
) -> dict[str, float]:
    """All-vs-all ID×spot verification without materialising the n² score matrix.

    id_emb, spot_emb: (n, d), row i of each = identity i. Genuine scores S_ii (n of them),
    impostor scores S_ij, i ≠ j (n(n−1)), S = cosine (rows L2-normalised when `normalize`; with
    `normalize=False` the raw dot product is the score). Returns
    `{far_key(f): TAR@f for f in fars, "eer": ..., "auc": ...}` with exactly the values that
    `tar_at_far`/`eer`/`auc` give on the dense list of n² scores (up to float32 GEMM rounding).

    S is computed in row blocks of `block` ID rows (block×n floats each). Per block:
    - TAR@FAR: only the largest k = ⌊max(fars)·n(n−1)⌋+1 impostor scores are kept (a running
      top-k: a block's scores below the current k-th largest are discarded before merging).
      TAR@f = #{genuine > v_f}/n with v_f the (⌊f·n(n−1)⌋+1)-th largest impostor.
    - EER/AUC: each impostor is counted into 2u+1 bins against the u sorted distinct genuine
      scores (strictly between two of them, or equal to one) with searchsorted + bincount. These
      counts give the exact ROC at every genuine score and just above it; the omitted vertices
      (thresholds at impostor scores only) lie on horizontal ROC segments, so the polyline —
      hence the trapezoidal AUC and the EER crossing — is unchanged.
    Peak extra memory: O(block·n) for one block of scores and its bin indices, plus O(k).
    """
    if id_emb.ndim != 2 or id_emb.shape != spot_emb.shape:
        raise ValueError(
            f"id_emb and spot_emb must both be (n, d) with the same shape; got "
            f"{tuple(id_emb.shape)} and {tuple(spot_emb.shape)}"
        )
    n = id_emb.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 identities for impostor pairs; got n={n}")
    if block < 1:
        raise ValueError(f"block must be ≥ 1; got {block}")
    fars = [float(f) for f in fars]
    for f in fars:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"each far must be in (0, 1]; got {f!r}")
    a, b = id_emb.detach().float().cpu(), spot_emb.detach().float().cpu()
    if normalize:
        a = torch.nn.functional.normalize(a, dim=1)
        b = torch.nn.functional.normalize(b, dim=1)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("embeddings contain NaN or inf")

    genuine = (a * b).sum(dim=1)
    n_imp = n * (n - 1)
    defined = [f for f in fars if n_imp >= min_impostors(f)]
    keep = min(n_imp, max((math.floor(f * n_imp * (1 + 1e-12)) + 1 for f in defined), default=0))
    top = torch.empty(0)
    uniq = torch.unique(genuine)  # sorted ascending
    bins = torch.zeros(2 * uniq.numel() + 1, dtype=torch.int64)

    for start in range(0, n, block):
        stop = min(start + block, n)
        scores = a[start:stop] @ b.T
        rows = torch.arange(stop - start)
        flat = scores.view(-1)
        # bin the whole block, then take the block's own genuine pairs back out (cheaper than
        # copying the impostors out); they are excluded from the top-k by −inf
        diagonal = scores[rows, rows + start]
        bins += _bin_counts(flat, uniq) - _bin_counts(diagonal, uniq)
        if keep:
            scores[rows, rows + start] = -math.inf
            cand = flat[flat > top[-1]] if top.numel() == keep else flat
            top = torch.cat([top, cand]).topk(min(keep, top.numel() + cand.numel())).values
    out: dict[str, float] = {}
    for f in fars:
        if f not in defined:
            out[far_key(f)] = math.nan
            continue
        allowed = math.floor(f * n_imp * (1 + 1e-12))
        out[far_key(f)] = (
            1.0 if allowed >= n_imp else float((genuine > top[allowed]).double().mean())
        )
    far, tar = _roc_from_bins(bins, uniq, genuine, n_imp)
    out["eer"] = _eer_from_roc(far, tar)
    out["auc"] = _auc_from_roc(far, tar)
    return out


def _bin_counts(imp: torch.Tensor, uniq: torch.Tensor) -> torch.Tensor:
    """Counts of `imp` in 2u+1 bins against ascending distinct values `uniq` (u,): bin 2i holds
    values strictly between uniq[i−1] and uniq[i], bin 2i+1 values equal to uniq[i]."""
    i = torch.searchsorted(uniq, imp)  # number of uniq < value
    equal = uniq[i.clamp(max=uniq.numel() - 1)] == imp
    return torch.bincount(2 * i + equal, minlength=2 * uniq.numel() + 1)


def _roc_from_bins(
    bins: torch.Tensor, uniq: torch.Tensor, genuine: torch.Tensor, n_imp: int
) -> tuple[np.ndarray, np.ndarray]:
    """ROC vertices (far, tar), FAR ascending, at thresholds +inf, then for each distinct
    genuine score g from the largest: just above g, and at g."""
    u = uniq.numel()
    gen_eq = torch.bincount(torch.searchsorted(uniq, genuine), minlength=u).double().numpy()
    b = bins.double().numpy()
    between, equal = b[0::2], b[1::2]  # between[i]: (uniq[i-1], uniq[i]); between[u]: > uniq[-1]
    # impostors ≥ uniq[i] = equal[i] + between[i+1] + (everything above), accumulated from the top
    above_eq = np.cumsum((equal + between[1:])[::-1])[::-1]  # #imp ≥ uniq[i]
    above = above_eq - equal  # #imp > uniq[i]
    gen_ge = np.cumsum(gen_eq[::-1])[::-1]  # #gen ≥ uniq[i]
    gen_gt = gen_ge - gen_eq
    # descending threshold order: for i = u−1 … 0, vertex "just above uniq[i]" then "at uniq[i]"
    fp = np.stack([above, above_eq], axis=1)[::-1].reshape(-1)
    tp = np.stack([gen_gt, gen_ge], axis=1)[::-1].reshape(-1)
    # threshold −inf: every pair accepted (impostors below the smallest genuine score)
    far = np.r_[0.0, fp / n_imp, 1.0]
    tar = np.r_[0.0, tp / genuine.numel(), 1.0]
    return far, tar
