"""Standard face-verification sets in insightface's `.bin` format (LFW, CFP-FP, AgeDB-30, …).

A `.bin` file is a pickle of `(bins, issame)`: `bins` a list of 2·n encoded images (JPEG/PNG
bytes; numpy uint8 arrays of those bytes are accepted too), `issame` a list of n booleans; pair
i is (bins[2i], bins[2i+1]), genuine when issame[i]. insightface wrote them with Python 2, so
they are read with `encoding="bytes"`; the unpickler only admits plain containers, bytes,
booleans and numpy arrays (a `.bin` is data, never code).

Evaluation (`evaluate_bin`), the LFW protocol as insightface runs it: images resized to
channels×image_size×image_size, normalised to [−1, 1] like training images, embedded
(optionally with horizontal-flip test-time fusion: embedding of the image + embedding of its
mirror), L2-normalised; the score of a pair is the cosine of its two embeddings. Accuracy =
mean over 10 contiguous folds of the accuracy at the threshold that is best on the other 9
(`harness.metrics.kfold_accuracy`); TAR@FAR over all pairs (`harness.metrics.tar_at_far`; NaN
when there are fewer than 1/FAR impostor pairs — LFW's 3,000 allow FAR ≥ 1/3000).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.data.image_folder import decode
from harness.data.stream import BadSample, normalize
from harness.metrics import kfold_accuracy, tar_at_far
from harness.records import far_key

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytes"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a .bin set")


@dataclass(frozen=True)
class VerificationSet:
    """A `.bin` set read into memory still encoded (LFW: ~60 MB): `images` 2·n encoded images,
    `issame` (n,) bool; `decode_block` decodes a range of images when they are embedded."""

    path: Path
    images: list[bytes]
    issame: np.ndarray
    image_size: int
    channels: int

    @property
    def name(self) -> str:
        """The column prefix: the file's stem ("lfw", "cfp_fp", "agedb_30")."""
        return self.path.stem

    def __len__(self) -> int:
        return len(self.images)

    def decode_block(self, start: int, stop: int, flip: bool = False) -> torch.Tensor:
        """float32 (stop − start, channels, size, size) in [−1, 1] (mirrored with `flip`);
        ValueError naming the file and the image for an undecodable image."""
        out = np.empty((stop - start, self.channels, self.image_size, self.image_size), np.uint8)
        for i in range(start, stop):
            where = f"{self.path} image {i}"
            try:
                a = decode(io.BytesIO(self.images[i]), self.image_size, self.channels, where)
            except BadSample as e:
                raise ValueError(str(e)) from None
            out[i - start] = a[..., ::-1] if flip else a
        return normalize(torch.from_numpy(out))


def read_bin(path: str | Path, image_size: int = 112, channels: int = 3) -> VerificationSet:
    """Read an insightface `.bin` set (module docstring); images stay encoded until embedded.
    A file that is not a pickle of (2·n images, n booleans) is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"verification set {str(path)!r} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any unpickling failure: truncated, not a pickle, foreign globals
        raise ValueError(
            f"verification set {str(path)!r} is not an insightface .bin "
            f"(a pickle of (images, issame)): {type(e).__name__}: {e}"
        ) from None
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise ValueError(
            f"verification set {str(path)!r}: expected a pickled pair (images, issame); "
            f"got {type(obj).__name__}"
        )
    bins, issame = obj
    try:
        images = [_as_bytes(b) for b in bins]
        same = np.asarray([_as_bool(v) for v in issame], dtype=bool)
    except (TypeError, ValueError) as e:
        raise ValueError(f"verification set {str(path)!r}: {e}") from None
    if len(same) == 0 or len(images) != 2 * len(same):
        raise ValueError(
            f"verification set {str(path)!r}: {len(images)} images for {len(same)} pairs; "
            "expected 2 images per pair and at least one pair"
        )
    return VerificationSet(path, images, same, image_size, channels)


def _as_bytes(b) -> bytes:
    if isinstance(b, bytes | bytearray):
        return bytes(b)
    if isinstance(b, np.ndarray) and b.dtype == np.uint8:
        return b.tobytes()
    raise TypeError(f"an image must be encoded bytes; got {type(b).__name__}")


def _as_bool(v) -> bool:
    if isinstance(v, bool | np.bool_) or (isinstance(v, int | np.integer) and v in (0, 1)):
        return bool(v)
    raise TypeError(f"issame must hold booleans; got {v!r}")


@torch.no_grad()
def embed_set(
    embed: Callable[[torch.Tensor], torch.Tensor],
    vs: VerificationSet,
    *,
    flip: bool = False,
    block: int = 256,
) -> torch.Tensor:
    """L2-normalised float64 (2·n, d) embeddings of every image of `vs` on the CPU; `embed` is
    called on float32 CPU blocks of at most `block` images. With `flip`, each embedding is the
    sum of the image's and its mirror's (before normalisation)."""
    parts = []
    for s in range(0, len(vs), block):
        stop = min(s + block, len(vs))
        e = embed(vs.decode_block(s, stop)).float().cpu()
        if flip:
            e = e + embed(vs.decode_block(s, stop, flip=True)).float().cpu()
        parts.append(e)
    return F.normalize(torch.cat(parts).double(), dim=1)  # float64: tiny or huge rows too


def evaluate_bin(
    embed: Callable[[torch.Tensor], torch.Tensor],
    path: str | Path,
    *,
    image_size: int,
    channels: int,
    fars: Sequence[float],
    flip: bool = False,
    folds: int = 10,
    block: int = 256,
) -> dict[str, float]:
    """Metrics of one `.bin` set (module docstring) as row columns named by the file's stem:
    `{f"{stem}_acc": mean k-fold accuracy, f"{stem}_{far_key(far)}": TAR@FAR for each far}`,
    e.g. {"lfw_acc": 0.9953, "lfw_tar@1e-3": 0.991}. ValueError naming the file for a bad
    .bin or an undecodable image."""
    vs = read_bin(path, image_size, channels)
    emb = embed_set(embed, vs, flip=flip, block=block)
    scores = (emb[0::2] * emb[1::2]).sum(dim=1).numpy()
    out = {f"{vs.name}_acc": kfold_accuracy(scores, vs.issame, min(folds, len(scores)))[0]}
    for far in fars:
        out[f"{vs.name}_{far_key(far)}"] = tar_at_far(scores, vs.issame, far)
    return out


def validate_sets(paths: Sequence[str]) -> None:
    """Cheap check for suite validation (`[eval] sets`): every path is an existing file ending
    in .bin, and no two share a stem (their columns would collide). ValueError naming the key."""
    stems: dict[str, str] = {}
    for p in paths:
        if not isinstance(p, str) or not p.endswith(".bin"):
            raise ValueError(f"eval.sets: {p!r} is not a path to an insightface .bin file")
        if not Path(p).is_file():
            raise ValueError(f"eval.sets: {p!r} does not exist or is not a file")
        stem = Path(p).stem
        if stem in stems:
            raise ValueError(f"eval.sets: {stems[stem]!r} and {p!r} would both report {stem}_acc")
        stems[stem] = p
