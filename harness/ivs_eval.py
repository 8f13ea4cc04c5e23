"""IvS verification at scale: all ID × spot pairs scored without materialising the n×m score
matrix, with exact scores so that ties are ties (docs/methods.md §6; the ROC rules are those of
`harness.metrics`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from harness.metrics import auc_from_roc, eer_from_roc, far_key, min_impostors

__all__ = ["COLLAPSE_SPREAD", "ivs_verification"]

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
    out["eer"] = eer_from_roc(far, tar)
    out["auc"] = auc_from_roc(far, tar)
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
