"""Synthetic ID-vs-Spot data with look-alike groups and a domain gap.

Generative model (all draws from generators seeded by `seed`; d = `dim`):

    centres   c_g ~ unit sphere,                          g = 1..lookalike_groups
    identity  z_i = normalize(c_{g_i} + group_spread · ε_i / √d),   g_i ~ U{groups}
    ID photo  x_i^ID   = W_ID   z_i + noise · η / √d
    spot      x_i^spot = W_spot z_i + noise · η' / √d
    W_ID = Q_a,  W_spot = cos(θ) Q_a + sin(θ) Q_b,  θ = domain_gap · π/2,  Q_a, Q_b random orthogonal

so identities of one group are look-alikes (E cos(z_i, z_j) ≈ 1/(1 + group_spread²)) and the
two photos of one identity differ by a fixed domain transform plus noise. With modality
"images" the photo vector v = W z is rendered as a 3×image_size×image_size image: a fixed random
map R (192×d) makes a 3×8×8 pattern R v (pixels ≈ N(0, 1)), bilinearly upsampled, plus
per-pixel noise · η.

Class imbalance (`imbalance` = α > 0, for the heads study): training identity i gets
e_i = min(imbalance_max, ⌊u^(−1/α)⌋ − 1) extra spot photos, u ~ U(0, 1] — a discrete Pareto
law, P(e_i ≥ k) = (k+1)^(−α): a few head identities get many photos, most keep 2.
Test identities always have exactly one pair.

Streaming: identity i belongs to chunk ⌊i / CHUNK⌋, whose samples come from a generator seeded
by (seed, chunk) alone, so any range of identities is generated in O(CHUNK) memory and is the
same however it is requested. Train identities are 0..identities−1, test identities follow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.data.ivs import IvSData, Split
from harness.data.params import check_choice, check_float, check_int, resolve

CHUNK = 1024  # identities per generator stream; part of the data definition, not a knob
PATTERN = 8  # side of the low-resolution pattern that an image is rendered from
CHANNELS = 3

# Defaults: with these, an MLP trained ~300 steps with in-batch batch-hard triplet reaches
# TAR@1e-3 well inside (0.2, 0.8) (docs/benchmarks.md, "IvS evaluation (issue 6)").
DEFAULTS: dict[str, Any] = {
    "identities": 4000,
    "test_identities": 1000,
    "dim": 64,
    "lookalike_groups": 200,
    "group_spread": 0.6,
    "domain_gap": 0.4,
    "noise": 0.4,
    "modality": "features",
    "image_size": 32,
    "imbalance": 0.0,
    "imbalance_max": 64,
}
MODALITIES = ("features", "images")


def _generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator for (seed, stream): independent streams via numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen))
    return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed


@dataclass(frozen=True)
class SyntheticIvS:
    """The fixed part of the generative model (centres, transforms, renderer) for one seed."""

    params: dict[str, Any]
    seed: int
    centres: torch.Tensor  # (G, d)
    w_id: torch.Tensor  # (d, d)
    w_spot: torch.Tensor  # (d, d)
    render: torch.Tensor  # (3·8·8, d), used for modality "images"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], seed: int) -> SyntheticIvS:
        p = resolve("synthetic_ivs", cfg, DEFAULTS)
        check_int(p, "identities", 3)
        check_int(p, "test_identities", 2)
        d = check_int(p, "dim", 2)
        groups = check_int(p, "lookalike_groups", 1)
        check_float(p, "group_spread", 0.0)
        gap = check_float(p, "domain_gap", 0.0, 1.0)
        check_float(p, "noise", 0.0)
        check_choice(p, "modality", MODALITIES)
        check_int(p, "image_size", PATTERN)
        check_float(p, "imbalance", 0.0)
        check_int(p, "imbalance_max", 0)
        gen = _generator(seed, 0)
        centres = F.normalize(torch.randn(groups, d, generator=gen), dim=1)
        q_a, q_b = _orthogonal(d, gen), _orthogonal(d, gen)
        theta = gap * math.pi / 2
        render = torch.randn(CHANNELS * PATTERN * PATTERN, d, generator=gen)
        return cls(p, seed, centres, q_a, math.cos(theta) * q_a + math.sin(theta) * q_b, render)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.params["modality"] == "images":
            s = self.params["image_size"]
            return (CHANNELS, s, s)
        return (self.params["dim"],)

    def chunks(
        self, start: int, stop: int, extras: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Samples of identities [start, stop), one chunk at a time: (x, identity, domain).

        Per chunk, rows are the ID photos of its identities in order, then their spot photos in
        order, then (with `extras` and imbalance > 0) the extra spot photos.
        """
        for c in range(start // CHUNK, (stop - 1) // CHUNK + 1):
            x, ident, domain = self._chunk(c, extras)
            rows = (ident >= start) & (ident < stop)
            yield x[rows], ident[rows], domain[rows]

    def _chunk(self, c: int, extras: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All samples of chunk c. Everything is drawn for the whole chunk in a fixed order
        (identities, base noise, then extras), so no value depends on the range requested and
        the base photos do not depend on `extras`."""
        p, d = self.params, self.params["dim"]
        gen = _generator(self.seed, 1 + c)
        group = torch.randint(self.centres.shape[0], (CHUNK,), generator=gen)
        eps = torch.randn(CHUNK, d, generator=gen)
        z = F.normalize(self.centres[group] + p["group_spread"] * eps / math.sqrt(d), dim=1)
        u = 1.0 - torch.rand(CHUNK, generator=gen, dtype=torch.float64)  # (0, 1]
        ident = torch.arange(CHUNK) + c * CHUNK
        v_spot = z @ self.w_spot.T
        x = self._render(torch.cat([z @ self.w_id.T, v_spot]), gen)
        ids, domain = torch.cat([ident, ident]), torch.arange(2).repeat_interleave(CHUNK)
        if not (extras and p["imbalance"] > 0):
            return x, ids, domain
        n_extra = (u ** (-1.0 / p["imbalance"])).floor().long() - 1
        rep = torch.repeat_interleave(torch.arange(CHUNK), n_extra.clamp(0, p["imbalance_max"]))
        return (
            torch.cat([x, self._render(v_spot[rep], gen)]),
            torch.cat([ids, ident[rep]]),
            torch.cat([domain, torch.ones(rep.numel(), dtype=torch.int64)]),
        )

    def _render(self, v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        p = self.params
        if p["modality"] == "features":
            d = p["dim"]
            return v + p["noise"] * torch.randn(v.shape, generator=gen) / math.sqrt(d)
        s = p["image_size"]
        pattern = (v @ self.render.T).view(-1, CHANNELS, PATTERN, PATTERN)
        img = F.interpolate(pattern, size=(s, s), mode="bilinear", align_corners=False)
        return img + p["noise"] * torch.randn(img.shape, generator=gen)


def build_synthetic_ivs(cfg: Mapping[str, Any], seed: int) -> IvSData:
    """`build_data` for kind "synthetic_ivs" (module docstring; keys and defaults in DEFAULTS)."""
    world = SyntheticIvS.from_config(cfg, seed)
    n, m = world.params["identities"], world.params["test_identities"]
    xs, labels, domains = zip(*world.chunks(0, n, extras=True), strict=True)
    train = Split(torch.cat(xs), torch.cat(labels), torch.cat(domains))
    test_x, test_ident, test_dom = (torch.cat(t) for t in zip(*world.chunks(n, n + m), strict=True))
    # rows by (domain, identity): ID photos then spot photos, each in identity order
    order = torch.argsort(test_dom * (n + m) + test_ident)
    test_x = test_x[order]
    return IvSData(
        train=train,
        test_id_x=test_x[:m],
        test_spot_x=test_x[m:],
        input_shape=world.input_shape,
        num_classes=n,
        info={"train_samples": train.x.shape[0]},
    )
