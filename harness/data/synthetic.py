"""Synthetic ID-vs-Spot data with look-alike groups, a domain gap and nuisance factors.

Generative model (all draws from generators seeded by `seed`; d = `dim`, h = ⌊d/2⌋ identity
dimensions, the other d − h are nuisance dimensions):

    centres   c_g ~ unit sphere in R^h,                       g = 1..lookalike_groups
    identity  z_i = normalize(c_{g_i} + group_spread · ε_i / √h),    g_i ~ U{groups}
    photo     x = Q [P_dom z_i ; nuisance · ν / √(d−h) + s_dom μ] + noise · η / √d
    P_ID = I,  P_spot = cos(θ) I + sin(θ) R,  θ = domain_gap · π/2,  s_ID = −1, s_spot = +1

with Q (d×d) and R (h×h) random orthogonal, μ a fixed unit vector of the nuisance space and
ν, η ~ N(0, I) fresh per photo. So: identities of one group are look-alikes
(E cos(z_i, z_j) ≈ 1/(1 + group_spread²)); the spot photo sees the identity through a rotated
view (undoable only by a model that recognises the domain, which μ makes visible); the
nuisance part dilutes raw cosine similarity but can be learned away; `noise` is irreducible.
With modality "images" the photo vector v (before `noise`) is rendered as a
3×image_size×image_size image: a fixed random map (192×d) makes a 3×8×8 pattern (pixels
≈ N(0, 1)), bilinearly upsampled, plus per-pixel noise · η.

Class imbalance (`imbalance` = α > 0, for the heads study): training identity i gets
e_i = min(imbalance_max, ⌊u^(−1/α)⌋ − 1) extra spot photos, u ~ U(0, 1] — a discrete Pareto
law, P(e_i ≥ k) = (k+1)^(−α): a few head identities get many photos, most keep 2.
Test identities always have exactly one pair.

Many-shot identities (a pretraining set): `photos_per_identity` = K > 2 gives every training
identity K − 2 more spot photos (drawn after the base pair and the imbalance extras, so the
base photos do not change); `domains = "spot"` makes the training ID photo a spot photo too (web
photos only); `identity_offset` = o takes identities o, o+1, … of the same world (same seed:
same look-alike centres, views and signature), so a pretraining set with a large offset shares
the IvS set's world but none of its identities.

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
    "group_spread": 0.5,
    "domain_gap": 0.4,
    "noise": 0.4,
    "nuisance": 1.5,
    "modality": "features",
    "image_size": 32,
    "imbalance": 0.0,
    "imbalance_max": 64,
    "photos_per_identity": 2,
    "domains": "ivs",
    "identity_offset": 0,
}
DOMAIN_MIXES = ("ivs", "spot")
MODALITIES = ("features", "images")


def _generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator for (seed, stream): independent streams via numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen))
    return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed


MAX_DIM = 8192
"""Largest `dim`: the generator draws a dim×dim random orthogonal matrix (QR, O(dim³))."""
MAX_BYTES = 16 * 2**30
"""Largest float32 size of the base photos (2 per identity, train and test): 16 GiB."""


def check_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every key, type and range of a synthetic_ivs `[data]` table, checked arithmetically
    (nothing is allocated): suite validation calls this for every trial. Refuses `dim` above
    MAX_DIM and data whose base photos would exceed MAX_BYTES, naming the keys."""
    p = resolve("synthetic_ivs", cfg, DEFAULTS)
    n = check_int(p, "identities", 3)
    m = check_int(p, "test_identities", 2)
    d = check_int(p, "dim", 2, MAX_DIM)
    check_int(p, "lookalike_groups", 1, 10_000_000)
    check_float(p, "group_spread", 0.0)
    check_float(p, "domain_gap", 0.0, 1.0)
    check_float(p, "noise", 0.0)
    check_float(p, "nuisance", 0.0)
    modality = check_choice(p, "modality", MODALITIES)
    s = check_int(p, "image_size", PATTERN, 4096)
    check_float(p, "imbalance", 0.0)
    check_int(p, "imbalance_max", 0, 1_000_000)
    k = check_int(p, "photos_per_identity", 2, 10_000)
    check_choice(p, "domains", DOMAIN_MIXES)
    check_int(p, "identity_offset", 0, 2**40)
    per_photo = CHANNELS * s * s if modality == "images" else d
    size = (k * n + 2 * m) * per_photo * 4
    if size > MAX_BYTES or p["lookalike_groups"] * (d // 2) * 4 > MAX_BYTES:
        raise ValueError(
            f"data.identities / data.test_identities / data.dim / data.image_size / "
            f"data.photos_per_identity describe {size / 2**30:.1f} GiB of float32 photos "
            f"(photos_per_identity·identities + 2·test_identities) × "
            f"{per_photo} values); the synthetic generator is limited to "
            f"{MAX_BYTES / 2**30:.0f} GiB"
        )
    return p


def input_shape(params: Mapping[str, Any]) -> tuple[int, ...]:
    """A sample's shape for resolved parameters: (3, image_size, image_size) for images, else
    (dim,). Suite validation calls it without building the generator."""
    if params["modality"] == "images":
        s = params["image_size"]
        return (CHANNELS, s, s)
    return (params["dim"],)


@dataclass(frozen=True)
class SyntheticIvS:
    """The fixed part of the generative model (module docstring) for one seed."""

    params: dict[str, Any]
    seed: int
    centres: torch.Tensor  # (G, h)
    p_spot: torch.Tensor  # (h, h): the spot view of the identity, P_spot
    mix: torch.Tensor  # (d, d): Q
    signature: torch.Tensor  # (d − h,): μ
    render: torch.Tensor  # (3·8·8, d), used for modality "images"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], seed: int) -> SyntheticIvS:
        p = check_params(cfg)
        d, groups, gap = p["dim"], p["lookalike_groups"], p["domain_gap"]
        h = d // 2
        gen = _generator(seed, 0)
        centres = F.normalize(torch.randn(groups, h, generator=gen), dim=1)
        theta = gap * math.pi / 2
        p_spot = math.cos(theta) * torch.eye(h) + math.sin(theta) * _orthogonal(h, gen)
        mix = _orthogonal(d, gen)
        signature = F.normalize(torch.randn(d - h, generator=gen), dim=0)
        render = torch.randn(CHANNELS * PATTERN * PATTERN, d, generator=gen)
        return cls(p, seed, centres, p_spot, mix, signature, render)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return input_shape(self.params)

    def chunks(
        self, start: int, stop: int, extras: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Samples of identities [start, stop), one chunk at a time: (x, identity, domain).

        Per chunk, rows are the ID photos of its identities in order, then their spot photos in
        order, then (with `extras`) the extra spot photos of the imbalance law and the
        photos_per_identity − 2 many-shot photos of each identity.
        """
        for c in range(start // CHUNK, (stop - 1) // CHUNK + 1):
            x, ident, domain = self._chunk(c, extras)
            rows = (ident >= start) & (ident < stop)
            yield x[rows], ident[rows], domain[rows]

    def latents(self, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
        """Chunk c's identity latents z (CHUNK, h), groups (CHUNK,) and the uniform draws u
        (CHUNK,) of the imbalance law, with its generator left positioned for the photos."""
        gen = _generator(self.seed, 1 + c)
        h = self.centres.shape[1]
        group = torch.randint(self.centres.shape[0], (CHUNK,), generator=gen)
        eps = torch.randn(CHUNK, h, generator=gen)
        z = F.normalize(
            self.centres[group] + self.params["group_spread"] * eps / math.sqrt(h), dim=1
        )
        u = 1.0 - torch.rand(CHUNK, generator=gen, dtype=torch.float64)  # (0, 1]
        return z, group, u, gen

    def _chunk(self, c: int, extras: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All samples of chunk c. Everything is drawn for the whole chunk in a fixed order
        (identities, base photos, then extras), so no value depends on the range requested and
        the base photos do not depend on `extras`."""
        p = self.params
        z, _, u, gen = self.latents(c)
        ident = torch.arange(CHUNK) + c * CHUNK
        ids, domain = torch.cat([ident, ident]), torch.arange(2).repeat_interleave(CHUNK)
        if extras and p["domains"] == "spot":  # training web photos only: no ID photo
            domain = torch.ones_like(domain)  # (same draws: only the view differs)
        x = self._photo(torch.cat([z, z]), domain, gen)
        if not extras:
            return x, ids, domain
        counts = torch.zeros(CHUNK, dtype=torch.int64)
        if p["imbalance"] > 0:
            counts += ((u ** (-1.0 / p["imbalance"])).floor().long() - 1).clamp(
                0, p["imbalance_max"]
            )
        counts += p["photos_per_identity"] - 2  # many-shot identities, drawn after the base
        if not counts.any():
            return x, ids, domain
        rep = torch.repeat_interleave(torch.arange(CHUNK), counts)
        ones = torch.ones(rep.numel(), dtype=torch.int64)
        return (
            torch.cat([x, self._photo(z[rep], ones, gen)]),
            torch.cat([ids, ident[rep]]),
            torch.cat([domain, ones]),
        )

    def _photo(self, z: torch.Tensor, domain: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Photos (n, *input_shape) of latents z (n, h) in `domain` (n,) (module docstring)."""
        p = self.params
        d, h = p["dim"], z.shape[1]
        view = torch.where(domain[:, None] == 1, z @ self.p_spot.T, z)
        nuisance = p["nuisance"] * torch.randn(z.shape[0], d - h, generator=gen) / math.sqrt(d - h)
        nuisance += (2 * domain[:, None] - 1) * self.signature
        v = torch.cat([view, nuisance], dim=1) @ self.mix.T
        if p["modality"] == "features":
            return v + p["noise"] * torch.randn(v.shape, generator=gen) / math.sqrt(d)
        s = p["image_size"]
        pattern = (v @ self.render.T).view(-1, CHANNELS, PATTERN, PATTERN)
        img = F.interpolate(pattern, size=(s, s), mode="bilinear", align_corners=False)
        return img + p["noise"] * torch.randn(img.shape, generator=gen)


def build_synthetic_ivs(cfg: Mapping[str, Any], seed: int, **_: Any) -> IvSData:
    """`build_data` for kind "synthetic_ivs" (module docstring; keys and defaults in DEFAULTS)."""
    world = SyntheticIvS.from_config(cfg, seed)
    n, m = world.params["identities"], world.params["test_identities"]
    o = world.params["identity_offset"]  # same world (seed), other identities
    xs, labels, domains = zip(*world.chunks(o, o + n, extras=True), strict=True)
    train = Split(torch.cat(xs), torch.cat(labels) - o, torch.cat(domains))
    test_x, test_ident, test_dom = (
        torch.cat(t) for t in zip(*world.chunks(o + n, o + n + m), strict=True)
    )
    test_ident = test_ident - o
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
