"""Independent references for the margin heads: scalar float64 loops written from methods.md §5.

Nothing here imports mining.heads. The tests at the bottom pin the references themselves to
hand-computed values, so that a wrong reference cannot agree with a wrong head.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

EPS = 1e-6  # the clamp of methods.md §5: cosines in [-1 + EPS, 1 - EPS]


# ------------------------------------------------------------------------------------ inputs
def make_batch(
    seed: int, batch: int, classes: int, dim: int, target_cos=None, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (emb (B, d), weight (C, d), labels (B,)) with a chosen target cosine per row.

    Row i is built as cos_i·ŵ_y + sin_i·u (u a unit vector ⟂ ŵ_y), times a random norm, so the
    target cosines cover (-1, 1) evenly (including ArcFace's fallback region) instead of
    clustering near 0 as random vectors do. ``target_cos``: optional values for the first rows.
    """
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    cos_t = torch.rand(batch, generator=gen, dtype=torch.float64) * 1.98 - 0.99
    if target_cos is not None:
        cos_t[: len(target_cos)] = torch.tensor(target_cos, dtype=torch.float64)
    w = weight[labels] / weight[labels].norm(dim=1, keepdim=True)
    u = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    u = u - (u * w).sum(1, keepdim=True) * w
    u = u / u.norm(dim=1, keepdim=True)
    norms = 0.5 + 2 * torch.rand(batch, 1, generator=gen, dtype=torch.float64)
    emb = norms * (cos_t[:, None] * w + torch.sqrt(1 - cos_t[:, None] ** 2) * u)
    return emb.to(dtype), weight.to(dtype), labels


# ------------------------------------------------------------------------------ cos matrix
def ref_cosines(emb, weight) -> list[list[float]]:
    """cos θ_ij by scalar loops, clamped to [-1 + EPS, 1 - EPS]."""
    e, w = np.asarray(emb, dtype=np.float64), np.asarray(weight, dtype=np.float64)
    out = []
    for row in e:
        out.append([])
        for col in w:
            dot = sum(a * b for a, b in zip(row, col, strict=True))
            c = dot / (math.sqrt(sum(a * a for a in row)) * math.sqrt(sum(b * b for b in col)))
            out[-1].append(min(max(c, -1 + EPS), 1 - EPS))
    return out


def ref_filter(cos, labels, threshold) -> list[list[float]]:
    """Interclass filtering: non-target cosines > threshold become 0."""
    if threshold is None:
        return [list(r) for r in cos]
    return [
        [0.0 if (j != y and c > threshold) else c for j, c in enumerate(row)]
        for row, y in zip(cos, labels, strict=True)
    ]


# ------------------------------------------------------------------------- per-head formulas
def arcface_target(c: float, m: float) -> float:
    """Classic ArcFace target cosine with the θ + m > π fallback."""
    if c > math.cos(math.pi - m):
        return math.cos(math.acos(c) + m)
    return c - m * math.sin(m)


def npcface_row(row, y, m, m0, m1, t, alpha):
    """NPCFace: (modified row, sample margin m', number of hard negatives)."""
    threshold = math.cos(math.acos(row[y]) + m)
    hard = [j for j, c in enumerate(row) if j != y and c > threshold]
    m_prime = m0 + m1 * (sum(row[j] for j in hard) / len(hard)) if hard else m0
    out = [t * c + alpha if j in hard else c for j, c in enumerate(row)]
    out[y] = math.cos(math.acos(row[y]) + m_prime) if row[y] > 0 else row[y]
    return out, m_prime, len(hard)


def hsm_class_margins(counts, m_max):
    """m_j = m_max · n_j^(-1/4) / max_k n_k^(-1/4) over seen classes; 0 for unseen."""
    top = max(n ** (-0.25) for n in counts if n > 0)
    return [m_max * n ** (-0.25) / top if n > 0 else 0.0 for n in counts]


def hsm_row(row, y, margin, s, pseudo, saturation, tau, delta, m_p):
    """HSM [recon]: (modified row (C or C + 1 entries, the last one None if masked), saturated)."""
    real = list(row)
    real[y] = row[y] - margin
    if pseudo == "none":
        return real, None
    if saturation == "prob":
        top = max(s * c for c in real)
        p_y = math.exp(s * real[y] - top) / sum(math.exp(s * c - top) for c in real)
        sat = p_y > tau
    else:
        sat = real[y] - max(c for j, c in enumerate(real) if j != y) > delta
    if pseudo == "false_class":
        return [c + m_p if (sat and j != y) else c for j, c in enumerate(real)], sat
    return [*real, (1 - m_p) if sat else None], sat


def curricularface_row(row, y, m, t):
    """CurricularFace with the (already updated) curriculum t: the modified row."""
    threshold = math.cos(math.acos(row[y]) + m)
    out = [c * (t + c) if (j != y and c > threshold) else c for j, c in enumerate(row)]
    out[y] = arcface_target(row[y], m)
    return out


def ema(old, value, momentum):
    """Exponential moving average: momentum · value + (1 − momentum) · old."""
    return momentum * value + (1 - momentum) * old


def norms_of(emb) -> list[float]:
    """‖e_i‖ by scalar loops."""
    return [math.sqrt(sum(x * x for x in row)) for row in np.asarray(emb, dtype=np.float64)]


def adaface_row(row, y, norm, mean, std, m, h):
    """AdaFace with the (already updated) norm statistics: the modified row."""
    eps = 1e-3
    a = min(max(norm, 0.001), 100.0)
    z = min(max(h * (a - mean) / (std + eps), -1.0), 1.0)
    g_angle, g_add = -m * z, m * z + m
    theta = min(max(math.acos(row[y]) + g_angle, eps), math.pi - eps)
    out = list(row)
    out[y] = math.cos(theta) - g_add
    return out


def adaface_stats(norms, mean, std, t_alpha):
    """AdaFace's running mean and (unbiased) std of the clipped norms after one batch."""
    a = [min(max(n, 0.001), 100.0) for n in norms]
    mu = sum(a) / len(a)
    sd = math.sqrt(sum((x - mu) ** 2 for x in a) / (len(a) - 1))
    return ema(mean, mu, t_alpha), ema(std, sd, t_alpha)


def magface_margin(norm, l_a, u_a, l_m, u_m):
    """m(a) for a = clamp(norm, l_a, u_a): linear from l_m at l_a to u_m at u_a."""
    a = min(max(norm, l_a), u_a)
    return l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)


def magface_regularizer(norms, l_a, u_a, lambda_g):
    """λ_g · mean g(a), g(a) = 1/a + a/u_a², a = clamp(norm, l_a, u_a)."""
    a = [min(max(n, l_a), u_a) for n in norms]
    return lambda_g * sum(1 / x + x / u_a**2 for x in a) / len(a)


def tukey_reference(values, k) -> np.ndarray:
    """UNPG outlier removal: quartiles by sorted index, inclusive fences; ascending order."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n == 0:
        return v
    q1, q3 = v[int(0.25 * n)], v[int(0.75 * n)]
    iqr = q3 - q1
    return np.array([x for x in v if q1 - k * iqr <= x <= q3 + k * iqr])


def negative_pairs_reference(emb, labels) -> list[float]:
    """Cosines of pairs i < j with different labels (scalar loops)."""
    e = np.asarray(emb, dtype=np.float64)
    out = []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            if labels[i] != labels[j]:
                dot = sum(a * b for a, b in zip(e[i], e[j], strict=True))
                out.append(
                    dot
                    / (math.sqrt(sum(a * a for a in e[i])) * math.sqrt(sum(b * b for b in e[j])))
                )
    return out


HEAD_DEFAULTS = {
    "cosine": {},
    "cosface": {"m": 0.35},
    "arcface": {"m": 0.5},
    "arcface_nograd": {"m": 0.5},
    "npcface": {"m": 0.5, "m0": 0.4, "m1": 0.2, "t": 1.1, "alpha": 0.2},
    "hsm": {
        "m_max": 0.5,
        "pseudo": "false_class",
        "saturation": "prob",
        "tau": 0.9,
        "delta": 0.3,
        "m_p": 0.2,
    },
    # the state before the batch is a parameter of the reference: t, the norm statistics
    "curricularface": {"m": 0.5, "momentum": 0.01, "t": 0.0},
    "adaface": {"m": 0.4, "h": 0.333, "t_alpha": 0.01, "batch_mean": 20.0, "batch_std": 100.0},
    "magface": {"l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8},
}


def ref_logits(name, emb, weight, labels, s=64.0, interclass_filter=None, **params):
    """Reference logits (B, C') as nested lists of floats (None = masked virtual column).

    ``name`` is a cosine head; ``params`` override HEAD_DEFAULTS[name]. For "hsm" pass
    ``class_counts``. The stateful heads (curricularface, adaface) update their state from
    this batch first, as in training mode. UNPG is composed in the tests from this and
    `tukey_reference`.
    """
    p = {**HEAD_DEFAULTS[name], **params}
    labels = [int(y) for y in labels]
    cos = ref_filter(ref_cosines(emb, weight), labels, interclass_filter)
    norms = norms_of(emb)
    margins = hsm_class_margins(p.pop("class_counts"), p["m_max"]) if name == "hsm" else None
    if name == "curricularface":
        t = ema(
            p["t"],
            sum(row[y] for row, y in zip(cos, labels, strict=True)) / len(cos),
            p["momentum"],
        )
    if name == "adaface" and len(norms) > 1:
        p["batch_mean"], p["batch_std"] = adaface_stats(
            norms, p["batch_mean"], p["batch_std"], p["t_alpha"]
        )
    out = []
    for i, (row, y) in enumerate(zip(cos, labels, strict=True)):
        row = list(row)
        if name == "cosface":
            row[y] -= p["m"]
        elif name == "arcface":
            row[y] = arcface_target(row[y], p["m"])
        elif name == "arcface_nograd":
            row[y] = math.cos(math.acos(row[y]) + p["m"])
        elif name == "npcface":
            row = npcface_row(row, y, **p)[0]
        elif name == "hsm":
            hsm = {k: v for k, v in p.items() if k != "m_max"}
            row = hsm_row(row, y, margins[y], s, **hsm)[0]
        elif name == "curricularface":
            row = curricularface_row(row, y, p["m"], t)
        elif name == "adaface":
            row = adaface_row(row, y, norms[i], p["batch_mean"], p["batch_std"], p["m"], p["h"])
        elif name == "magface":
            row[y] = arcface_target(row[y], magface_margin(norms[i], **p))
        out.append([None if c is None else s * c for c in row])
    return out


def assert_logits_match(actual: torch.Tensor, expected, rtol=1e-10, atol=1e-9) -> None:
    """Compare head logits with a reference; None entries must be the most negative float."""
    a = actual.detach().cpu().numpy().astype(np.float64)
    masked = np.array([[c is None for c in row] for row in expected])
    e = np.array([[0.0 if c is None else c for c in row] for row in expected])
    assert a.shape == e.shape
    np.testing.assert_allclose(a[~masked], e[~masked], rtol=rtol, atol=atol)
    assert (a[masked] <= np.finfo(np.float32).min).all()


# ----------------------------------------------------------------- tests of the references
def test_reference_cosines_and_filter_by_hand():
    cos = ref_cosines([[1.0, 0.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    np.testing.assert_allclose(cos, [[1 - EPS, 0.0, -1 + EPS], [0.6, 0.8, -0.6]], atol=1e-15)
    assert ref_filter(cos, [0, 0], 0.5) == [cos[0], [0.6, 0.0, -0.6]]


def test_reference_arcface_by_hand():
    # θ = 60°, m = 0.5: cos(π/3 + 0.5); fallback at cos θ = -0.95 < cos(π - 0.5) ≈ -0.8776
    assert arcface_target(0.5, 0.5) == pytest.approx(math.cos(math.pi / 3 + 0.5))
    assert arcface_target(-0.95, 0.5) == pytest.approx(-0.95 - 0.5 * math.sin(0.5))


def test_reference_npcface_by_hand():
    # target cos 0.6 -> threshold cos(acos(0.6) + 0.5) ≈ 0.1853; hard: 0.7 and 0.3, not 0.1
    row, m_prime, n_hard = npcface_row([0.6, 0.7, 0.1, 0.3], 0, 0.5, 0.4, 0.2, 1.1, 0.2)
    assert n_hard == 2 and m_prime == pytest.approx(0.4 + 0.2 * 0.5)
    assert row == pytest.approx([math.cos(math.acos(0.6) + 0.5), 0.97, 0.1, 0.53])
    assert npcface_row([-0.2, 0.9], 0, 0.5, 0.4, 0.2, 1.1, 0.2)[0][0] == -0.2  # cos θ_y <= 0


def test_reference_hsm_by_hand():
    assert hsm_class_margins([16, 1, 0], 0.5) == pytest.approx([0.25, 0.5, 0.0])
    row, sat = hsm_row([0.9, 0.1], 0, 0.25, 64.0, "false_class", "gap", 0.9, 0.3, 0.2)
    assert sat and row == pytest.approx([0.65, 0.3])
    row, sat = hsm_row([0.9, 0.1], 0, 0.25, 64.0, "virtual_class", "gap", 0.9, 0.6, 0.2)
    assert not sat and row[:2] == pytest.approx([0.65, 0.1]) and row[2] is None


def test_reference_tukey_by_hand():
    # n = 8: Q1 = v[2] = 2, Q3 = v[6] = 6, IQR = 4, k = 1 -> keep [-2, 10]
    kept = tukey_reference([6, 1, 100, 2, 3, 4, -30, 5], 1.0)
    np.testing.assert_array_equal(kept, [1, 2, 3, 4, 5, 6])
    assert negative_pairs_reference([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0, 0, 1]) == (
        pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])
    )


def test_reference_curricularface_by_hand():
    # threshold cos(acos(0.6) + 0.5) ≈ 0.1853: 0.7 and 0.3 are hard, 0.1 is not
    row = curricularface_row([0.6, 0.7, 0.1, 0.3], 0, 0.5, 0.2)
    assert row == pytest.approx([math.cos(math.acos(0.6) + 0.5), 0.7 * 0.9, 0.1, 0.3 * 0.5])
    assert ema(0.0, 0.6, 0.01) == pytest.approx(0.006)


def test_reference_adaface_by_hand():
    # z = clip(1 · (3 − 2) / (0.999 + 0.001), −1, 1) = 1: g_angle = −0.4, g_add = 0.8
    row = adaface_row([0.6, 0.1], 0, 3.0, 2.0, 0.999, 0.4, 1.0)
    assert row == pytest.approx([math.cos(math.acos(0.6) - 0.4) - 0.8, 0.1])
    # z = 0 (norm at the mean): an additive margin m alone
    assert adaface_row([0.6, 0.1], 0, 2.0, 2.0, 1.0, 0.4, 1.0)[0] == pytest.approx(0.2)
    mean, std = adaface_stats([1.0, 3.0], 20.0, 100.0, 0.5)
    assert (mean, std) == pytest.approx((11.0, 50 + math.sqrt(2) / 2))


def test_reference_magface_by_hand():
    assert magface_margin(60.0, 10.0, 110.0, 0.45, 0.8) == pytest.approx(0.625)
    assert magface_margin(5.0, 10.0, 110.0, 0.45, 0.8) == pytest.approx(0.45)  # clamped at l_a
    assert magface_margin(500.0, 10.0, 110.0, 0.45, 0.8) == pytest.approx(0.8)
    expected = 35 * ((1 / 60 + 60 / 110**2) + (1 / 110 + 110 / 110**2)) / 2
    assert magface_regularizer([60.0, 200.0], 10.0, 110.0, 35.0) == pytest.approx(expected)
