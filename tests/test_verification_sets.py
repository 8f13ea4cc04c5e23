"""insightface `.bin` verification sets (LFW / CFP-FP / AgeDB format), written by the tests."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data.verification_sets import evaluate_bin, read_bin, validate_sets
from harness.metrics import kfold_accuracy


def png(value: int, mirror_value: int | None = None) -> bytes:
    """A 16×16 image: left half `value`, right half `mirror_value` (default the same)."""
    a = np.full((16, 16, 3), value, dtype=np.uint8)
    a[:, 8:] = value if mirror_value is None else mirror_value
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def write_bin(path, pairs, as_arrays=False, protocol=2) -> None:
    """pairs: list of ((value_a, value_b), issame); pickled as insightface does (bins, issame)."""
    bins = []
    for (a, b), _ in pairs:
        for v in (a, b):
            data = png(*v) if isinstance(v, tuple) else png(v)
            bins.append(np.frombuffer(data, dtype=np.uint8) if as_arrays else data)
    with open(path, "wb") as f:
        pickle.dump((bins, [s for _, s in pairs]), f, protocol=protocol)


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Embedding (2,): direction given by the mean grey level of the left half."""
    v = x[:, 0, :, : x.shape[3] // 2].mean(dim=(1, 2))
    return torch.stack([torch.cos(v), torch.sin(v)], dim=1)


def test_accuracy_and_tar_match_the_protocol(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(40):
        same = bool(i % 2)
        a = int(rng.integers(0, 256))
        b = min(255, a + int(rng.integers(0, 20))) if same else int(rng.integers(0, 256))
        pairs.append(((a, b), same))
    write_bin(tmp_path / "lfw.bin", pairs)
    out = evaluate_bin(brightness, tmp_path / "lfw.bin", image_size=8, channels=3, fars=[0.1, 1e-3])
    assert set(out) == {"lfw_acc", "lfw_tar@1e-1", "lfw_tar@1e-3"}
    # the same numbers computed by hand from the pixel values
    vs = read_bin(tmp_path / "lfw.bin", 8, 3)
    e = torch.nn.functional.normalize(brightness(vs.decode_block(0, len(vs))), dim=1)
    scores = (e[0::2] * e[1::2]).sum(1).double().numpy()
    assert out["lfw_acc"] == pytest.approx(kfold_accuracy(scores, vs.issame, 10)[0])
    assert 0.5 < out["lfw_acc"] <= 1.0 and 0 <= out["lfw_tar@1e-1"] <= 1
    assert math.isnan(out["lfw_tar@1e-3"])  # 20 impostor pairs < 1/FAR
    # numpy-array images (some releases) and a protocol-0 pickle read the same
    write_bin(tmp_path / "cfp_fp.bin", pairs, as_arrays=True, protocol=0)
    out2 = evaluate_bin(brightness, tmp_path / "cfp_fp.bin", image_size=8, channels=3, fars=[0.1])
    assert out2["cfp_fp_acc"] == out["lfw_acc"]


def test_flip_fusion_sums_image_and_mirror(tmp_path):
    # left half a, right half b: the mirror swaps them. With fusion, the embedding of each
    # image is e(left) + e(right), so pairs that differ only by a mirror score exactly 1
    pairs = [(((10, 200), (200, 10)), True), (((10, 200), (120, 120)), False)] * 5
    write_bin(tmp_path / "agedb_30.bin", pairs)
    calls = []

    def embed(x):
        calls.append(x.shape[0])
        return brightness(x)

    kw = {"image_size": 16, "channels": 1, "fars": [0.5], "folds": 2}
    plain = evaluate_bin(embed, tmp_path / "agedb_30.bin", **kw)
    n_plain = sum(calls)
    fused = evaluate_bin(embed, tmp_path / "agedb_30.bin", flip=True, **kw)
    assert n_plain == 20 and sum(calls) - n_plain == 40  # each image and its mirror
    assert fused["agedb_30_acc"] == 1.0 and plain["agedb_30_acc"] < 1.0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a pickle at all", "not an insightface .bin"),
        (pickle.dumps({"a": 1}), "expected a pickled pair"),
        (pickle.dumps(([b"x"] * 3, [True, False])), "3 images for 2 pairs"),
        (pickle.dumps(([1, 2], [True])), "encoded bytes"),
        (pickle.dumps(([b"x", b"y"], ["yes"])), "booleans"),
        (pickle.dumps((torch.nn.Linear, [True])), "not allowed"),  # never executes a global
        (pickle.dumps(([], [])), "at least one pair"),
    ],
)
def test_bad_bin_names_the_file(tmp_path, content, match):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        read_bin(path, 8, 3)
    assert "bad.bin" in str(info.value)


def test_undecodable_image_and_missing_file(tmp_path):
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as f:
        pickle.dump(([png(1), b"garbage", png(3), png(4)], [True, False]), f)
    with pytest.raises(ValueError, match=r"lfw\.bin image 1"):
        evaluate_bin(brightness, path, image_size=8, channels=3, fars=[0.5], folds=2)
    with pytest.raises(ValueError, match=r"nope\.bin"):
        read_bin(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match=r"eval\.sets: .*nope\.bin"):
        validate_sets([str(tmp_path / "nope.bin")])
    other = tmp_path / "x"
    other.mkdir()
    (other / "lfw.bin").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="lfw_acc"):
        validate_sets([str(path), str(other / "lfw.bin")])
    validate_sets([str(path)])
