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
worst possible. `ivs_verification` therefore computes every score exactly (see there), and
reports `collapsed` when the embeddings have about one direction (`COLLAPSE_SPREAD`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "COLLAPSE_SPREAD",
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

COLLAPSE_SPREAD = 1e-6
"""`collapsed` threshold on the spread of a side's L2-normalised embeddings (`_spread`)."""

_GRID_BITS = 24  # fixed-point fraction bits of the exact scores (`_fixed_point`)


def ivs_verification(
    id_emb: torch.Tensor,
    spot_emb: torch.Tensor,
    fars: Sequence[float],
    *,
    id_labels: torch.Tensor | None = None,
    spot_labels: torch.Tensor | None = None,
    symmetric: bool = False,
    block: int = 1024,
    normalize: bool = True,
) -> dict[str, float | bool]:
    """All-vs-all ID×spot verification without materialising the n×m score matrix.

    id_emb (n, d), spot_emb (m, d); S = cosine (rows L2-normalised when `normalize`; with
    `normalize=False` the raw dot product is the score). Which pairs (i, j) count:
    - no labels (n = m): row i of each = identity i; genuine S_ii (n), impostor S_ij, i ≠ j
      (n(n−1)).
    - `id_labels` (n,), `spot_labels` (m,) int: genuine = id_labels[i] == spot_labels[j],
      impostor = the other n·m − n_gen pairs (several photos per identity on either side).
    - `symmetric=True` (needs labels; id and spot are the same n samples, equal labels; the
      image-folder "all_pairs" protocol): only the unordered pairs {i, j}, i < j, count, each
      once — a sample is never paired with itself, and (j, i) is not a second pair.
    Returns `{far_key(f): TAR@f for f in fars, "eer": ..., "auc": ..., "collapsed": bool}`; the
    figures are exactly what `tar_at_far`/`eer`/`auc` give on the dense list of those pairs'
    scores (module docstring: ties never count in the method's favour).

    Exact scores. Each embedding row is rounded to a power-of-two fixed-point grid of its own,
    `_fixed_point` (24 bits: step 2^-24 ≈ 6e-8 for unit rows, below the float32 rounding of a
    cosine). On those grids every product of two coordinates and every partial sum of a dot product
    is an integer multiple of step_r·step_c below 2^50 of them, so float64 arithmetic computes each
    score *without rounding*, in any summation order, FMA or not; it is then rounded once to
    float32 (monotone: no order is inverted). A score is therefore a function of the two embedding
    rows alone — not of the op (GEMM or row-wise product), the block, or the position — and equal
    rows give bit-equal scores. (A float32 GEMM does not: MKL gives identical rows 1-ulp different
    scores at tile edges, and `(a*b).sum(1)` rounds differently from `a @ b.T`; collapsed
    embeddings then scored TAR 1/EER 0/AUC 1 at random.) With `normalize=False`, embeddings whose
    dot products could leave the float32 range (max‖a_i‖·max‖b_j‖ > 3.4e38) raise ValueError.

    `collapsed` (bool): True when either side's L2-normalised embeddings (of a side with ≥ 2
    rows) have `_spread` ≤ `COLLAPSE_SPREAD` = 1e-6, i.e. 1 − (mean cosine over all its ordered
    pairs, self-pairs included) ≤ 1e-6: every direction within ~1e-3 rad RMS of the mean, so that
    scores differ by ~1e-6, a few float32 rounding units, or all rows zero. The figures are then
    ties and rounding (chance at best) and say nothing about the method.

    Computation. Genuine scores are computed first from the genuine (i, j) index list (labels
    sorted and matched, O(n_gen) memory). S is then computed in row blocks of `block` ID rows
    (block×m entries each; symmetric: only columns ≥ the block's first row); in each block the
    non-impostor entries (genuine pairs, and for `symmetric` the diagonal and lower triangle) are
    set to −inf and so drop out of both statistics:
    - TAR@FAR: only the largest k = ⌊max(fars)·n_imp⌋+1 impostor scores are kept (a running
      top-k: a block's scores below the current k-th largest are discarded before merging).
      TAR@f = #{genuine > v_f}/n_gen with v_f the (⌊f·n_imp⌋+1)-th largest impostor.
    - EER/AUC: each impostor not below the smallest genuine score is counted into 2u+1 bins
      against the u sorted distinct genuine scores (strictly between two of them, or equal to
      one) with searchsorted + bincount. These counts give the exact ROC at every genuine score
      and just above it; the omitted vertices (thresholds at impostor scores only) lie on
      horizontal ROC segments, so the polyline — hence the trapezoidal AUC and the EER crossing —
      is unchanged.
    Peak extra memory: O(block·m) for one block of scores and its bin indices, plus O(k + n_gen)
    and float64 copies of the embeddings, O((n + m)·d).
    """
    a, b = _checked_embeddings(id_emb, spot_emb, id_labels, spot_labels, normalize)
    if block < 1:
        raise ValueError(f"block must be ≥ 1; got {block}")
    fars = [float(f) for f in fars]
    for f in fars:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"each far must be in (0, 1]; got {f!r}")
    n, m = a.shape[0], b.shape[0]
    if id_labels is None:
        if symmetric:
            raise ValueError("symmetric=True needs id_labels and spot_labels")
        gen_i = gen_j = torch.arange(n)
    else:
        id_labels, spot_labels = id_labels.cpu().long(), spot_labels.cpu().long()
        if symmetric and not torch.equal(id_labels, spot_labels):
            raise ValueError(
                "symmetric=True needs equal id_labels and spot_labels (one sample set)"
            )
        gen_i, gen_j = _genuine_pairs(id_labels, spot_labels, symmetric)
    n_pairs = n * (n - 1) // 2 if symmetric else n * m
    n_imp = n_pairs - gen_i.numel()
    if gen_i.numel() == 0 or n_imp == 0:
        raise ValueError(
            f"labels give {gen_i.numel()} genuine and {n_imp} impostor pairs; need ≥ 1 of each"
        )
    sides = (a,) if symmetric else (a, b)
    collapsed = any(_spread(x) <= COLLAPSE_SPREAD for x in sides if x.shape[0] >= 2)
    a, b = _fixed_point(a), _fixed_point(b)  # float64; exact products and sums from here on
    # |score| ≤ ‖a_i‖·‖b_j‖; a float32 ±inf score would tie with the −inf mask below
    bound = float(a.norm(dim=1).max()) * float(b.norm(dim=1).max())
    if bound > torch.finfo(torch.float32).max:
        raise ValueError(
            f"dot products of these embeddings can reach {bound:.3g}, beyond float32; "
            "normalize or rescale them"
        )

    genuine = torch.cat(
        [
            (a[gen_i[k : k + block]] * b[gen_j[k : k + block]]).sum(dim=1).float()
            for k in range(0, gen_i.numel(), block)
        ]
    )
    defined = [f for f in fars if n_imp >= min_impostors(f)]
    keep = min(n_imp, max((math.floor(f * n_imp * (1 + 1e-12)) + 1 for f in defined), default=0))
    top = torch.empty(0)
    uniq = torch.unique(genuine)  # sorted ascending
    bins = torch.zeros(2 * uniq.numel() + 1, dtype=torch.int64)
    # gen_i is ascending: a block's genuine pairs are one slice of the list
    bounds = torch.searchsorted(gen_i, torch.arange(0, n + block, block).clamp(max=n)).tolist()

    for k, start in enumerate(range(0, n, block)):
        stop = min(start + block, n)
        col0 = start if symmetric else 0
        scores = (a[start:stop] @ b[col0:].T).float()
        drop_r = gen_i[bounds[k] : bounds[k + 1]] - start
        drop_c = gen_j[bounds[k] : bounds[k + 1]] - col0
        if symmetric:  # the diagonal and below: self-pairs and mirrored duplicates
            tril = torch.tril_indices(stop - start, stop - start)
            drop_r, drop_c = torch.cat([drop_r, tril[0]]), torch.cat([drop_c, tril[1]])
        scores[drop_r, drop_c] = -math.inf
        flat = scores.view(-1)
        bins += _bin_counts(flat, uniq)
        if keep:
            cand = flat[flat > top[-1]] if top.numel() == keep else flat
            top = torch.cat([top, cand]).topk(min(keep, top.numel() + cand.numel())).values
    out: dict[str, float | bool] = {}
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
    out["collapsed"] = collapsed
    return out


def _fixed_point(x: torch.Tensor) -> torch.Tensor:
    """float64 copy of x (n, d), each row r rounded to its own grid step_r = 2^(e_r − 24), e_r the
    least integer with ‖x_r‖ ≤ 2^e_r (up to a 1e-6 slack in log2: e_r = 0 for unit rows whose norm
    rounds to 1 ± 1e-7; e_r = 0 for a zero row). step_r depends on row r alone, so equal rows stay
    equal, and a small-norm row (`normalize=False`) keeps 24 bits however large the other rows.

    Why a dot product of two such rows r, c is exact in float64: coordinate i of row r is
    p_i·step_r with p_i an integer, |p_i| ≤ 2^24·|x_ri|/2^e_r + ½, so a product is
    (p_i q_i)·step_r·step_c and a partial sum Σ p_i q_i (any subset, any order) is an integer with
    |Σ| ≤ ‖p‖·‖q‖ ≤ (2^24·(1 + 1e-6) + √d/2)² < 2^50 (Cauchy–Schwarz) — below 2^53, so every
    product and every partial sum is representable: no rounding in any order, FMA or not.
    Multiplying by powers of two is exact too: float32 inputs put step_r in [2^-173, 2^+115] (with
    d < 2^20), so step_r·step_c·2^50 stays far inside float64's normal range.
    """
    x = x.double()
    norm = x.norm(dim=1, keepdim=True)
    # log2 slack: a unit row whose norm rounds to 1 + 1e-7 keeps e = 0 (the bound above allows it)
    exponent = torch.where(norm > 0, torch.ceil(torch.log2(norm) - 1e-6), torch.zeros_like(norm))
    step = torch.exp2(exponent - _GRID_BITS)
    return torch.round(x / step) * step


def _spread(x: torch.Tensor) -> float:
    """Mean squared distance of x's L2-normalised rows to their mean, in float64.

    For unit rows u_1…u_N this is 1 − ‖ū‖² = 1 − (1/N²)·Σ_{i,j} u_i·u_j: one minus the mean cosine
    over all ordered pairs, self-pairs included (over distinct pairs: 1 − N/(N−1)·spread). 0 when
    all rows have one direction (or are all zero), about 1 for directions spread over the sphere.
    """
    u = _unit_rows(x)
    return float(((u - u.mean(dim=0)) ** 2).sum(dim=1).mean())


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x's rows divided by their norms, in float64 (zero rows stay zero). Unlike
    `F.normalize` (which divides by max(‖x‖, 1e-12)) a row of norm 1e-20 becomes a unit row
    too, and float64 norms of float32 rows neither overflow nor underflow."""
    x = x.double()
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _checked_embeddings(
    id_emb: torch.Tensor,
    spot_emb: torch.Tensor,
    id_labels: torch.Tensor | None,
    spot_labels: torch.Tensor | None,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and labels; float32 CPU copies, L2-normalised (in float64) if `normalize`."""
    if (id_labels is None) != (spot_labels is None):
        raise ValueError("give both id_labels and spot_labels, or neither")
    if id_labels is None:
        if id_emb.ndim != 2 or id_emb.shape != spot_emb.shape:
            raise ValueError(
                f"id_emb and spot_emb must both be (n, d) with the same shape; got "
                f"{tuple(id_emb.shape)} and {tuple(spot_emb.shape)}"
            )
        if id_emb.shape[0] < 2:
            raise ValueError(
                f"need at least 2 identities for impostor pairs; got n={id_emb.shape[0]}"
            )
    else:
        if id_emb.ndim != 2 or spot_emb.ndim != 2 or id_emb.shape[1] != spot_emb.shape[1]:
            raise ValueError(
                f"id_emb (n, d) and spot_emb (m, d) must share d; got {tuple(id_emb.shape)} "
                f"and {tuple(spot_emb.shape)}"
            )
        for name, lab, emb in (
            ("id_labels", id_labels, id_emb),
            ("spot_labels", spot_labels, spot_emb),
        ):
            if lab.shape != (emb.shape[0],) or lab.is_floating_point() or lab.is_complex():
                raise ValueError(
                    f"{name} must be an integer tensor of shape ({emb.shape[0]},); got "
                    f"{lab.dtype} {tuple(lab.shape)}"
                )
    a, b = id_emb.detach().float().cpu(), spot_emb.detach().float().cpu()
    if normalize:
        a, b = _unit_rows(a).float(), _unit_rows(b).float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("embeddings contain NaN or inf")
    return a, b


def _genuine_pairs(
    id_labels: torch.Tensor, spot_labels: torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (i, j), i ascending, of every pair with id_labels[i] == spot_labels[j]
    (and i < j when `symmetric`). Size Σ_label n_label·m_label, never n·m."""
    order = torch.argsort(spot_labels, stable=True)
    lo = torch.searchsorted(spot_labels[order], id_labels)
    count = torch.searchsorted(spot_labels[order], id_labels, right=True) - lo
    i = torch.repeat_interleave(torch.arange(id_labels.numel()), count)
    # rank of each pair inside its ID row's run of matching spot rows
    rank = torch.arange(i.numel()) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    j = order[lo[i] + rank]
    if symmetric:
        i, j = i[j > i], j[j > i]
    return i, j


def _bin_counts(scores: torch.Tensor, uniq: torch.Tensor) -> torch.Tensor:
    """Counts of `scores` in 2u+1 bins against ascending distinct values `uniq` (u,): bin 2i holds
    values strictly between uniq[i−1] and uniq[i], bin 2i+1 values equal to uniq[i].

    Bin 0 (below uniq[0], where the masked −inf entries land too) is never read by the ROC, so it
    is left 0 and, when it holds most of the scores, they are filtered out before the binary
    search.
    """
    above = scores >= uniq[0]
    n_above = int(above.sum())
    if n_above < scores.numel() // 2:
        scores = scores[above]
    del above
    i = torch.searchsorted(uniq, scores)  # number of uniq < value
    # NaN sentinel at index u: never equal, so values above uniq[-1] (i = u) stay in bin 2u
    equal = torch.cat([uniq, uniq.new_full((1,), math.nan)])[i] == scores
    counts = torch.bincount(i.mul_(2).add_(equal), minlength=2 * uniq.numel() + 1)
    counts[0] = 0
    return counts


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
