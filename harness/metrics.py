"""Verification metrics: ROC, TAR@FAR, EER, AUC, k-fold accuracy and the IvS evaluation.

Definitions (docs/methods.md §6). A pair is *accepted* at threshold t when its score s ≥ t.

    TAR(t) = #{genuine s ≥ t} / n_gen          FAR(t) = #{impostor s ≥ t} / n_imp

The ROC is exact: one vertex per distinct score, no threshold grid. All pairs tied at a score are
accepted or rejected together — a threshold never splits a tie — so a tie of genuine and impostor
pairs is one diagonal ROC step. All functions accept 1-D torch tensors or numpy arrays and
compute in float64 on CPU.

Rules stated once here (ties are never resolved in the method's favour):
- **TAR@FAR** = the TAR at the lowest threshold whose FAR ≤ `far` = the largest TAR among ROC
  vertices with FAR ≤ `far`. Equivalently, with v the (⌊far·n_imp⌋+1)-th largest impostor
  score, TAR@FAR = #{genuine s > v} / n_gen: genuine pairs tied with v are not counted, since
  accepting them accepts v's impostors too. It is NaN ("n/a") when n_imp < 1/far: below that the
  only admissible threshold rejects every impostor and the figure says nothing about the FAR
  asked for.
- **EER** = the point where the ROC polyline (vertices joined by straight segments) crosses the
  line FAR = 1 − TAR; the value is that FAR. The polyline is monotone, so the crossing is unique.
  A tie sits on a diagonal segment, i.e. counts half: every score tied gives EER = 0.5.
- **AUC** = trapezoidal area under the exact ROC = P(s_gen > s_imp) + ½·P(s_gen = s_imp), the
  Mann–Whitney statistic with ties counted ½ (what `sklearn.metrics.roc_auc_score` returns).

So scores that are equal must be *bit*-equal: a 1-ulp difference between a genuine score and its
tied impostors turns chance (TAR 0, EER 0.5, AUC 0.5) into "perfect" (TAR 1, EER 0, AUC 1) or the
worst possible. `harness.ivs_eval.ivs_verification` therefore computes every score exactly,
and reports `collapsed` when the embeddings have about one direction.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.records import far_key

__all__ = [
    "auc",
    "auc_from_roc",
    "eer",
    "eer_from_roc",
    "far_key",
    "kfold_accuracy",
    "min_impostors",
    "roc",
    "tar_at_far",
]


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


def eer_from_roc(far: np.ndarray, tar: np.ndarray) -> float:
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
    return eer_from_roc(far, tar)


def auc_from_roc(far: np.ndarray, tar: np.ndarray) -> float:
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def auc(scores, is_genuine) -> float:
    """Area under the exact ROC (trapezoids) = P(gen > imp) + ½·P(gen = imp)."""
    far, tar, _ = roc(scores, is_genuine)
    return auc_from_roc(far, tar)


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
