"""Files a trial writes and reads besides its row: checkpoints, the trained model, and
pretrained weights (`model.init`).

Layout under the trial's workdir (`<run>/work/<trial_id>/`):

    ckpt-00000200.pt   the state after 200 completed steps (the last `KEEP` are kept)
    model.pt           the backbone's state_dict after the last step (`train.save_model`)

Every file is written to a temporary name in the same directory, fsynced and renamed, so a kill
leaves either the previous file or the new one, never half of one. Files are read with
`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts only — no code runs.
A checkpoint that cannot be read, or that belongs to another configuration, is never loaded:
`latest` falls back to the previous one (or to step 0) and says so.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.results_io import atomic_write

KEEP = 2  # checkpoints kept: the newest may be the one a kill interrupted before its rename


def _atomic_save(obj: Any, path: Path) -> int:
    """torch.save `obj` to `path` atomically (`results_io.atomic_write`); returns the bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())
    return buf.tell()


def save_checkpoint(workdir: Path, step: int, state: dict[str, Any]) -> int:
    """Write `state` as `ckpt-<step>.pt` and drop all but the newest `KEEP`; returns bytes."""
    workdir.mkdir(parents=True, exist_ok=True)
    size = _atomic_save(state, workdir / f"ckpt-{step:08d}.pt")
    for old in sorted(workdir.glob("ckpt-*.pt"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return size


def latest_checkpoint(workdir: Path | None, config_key: str) -> tuple[dict[str, Any] | None, str]:
    """The newest readable checkpoint of this configuration, and a note on what was skipped.

    Returns (None, note) when there is none: the trial then starts from step 0.
    """
    if workdir is None or not workdir.is_dir():
        return None, ""
    notes = []
    for path in sorted(workdir.glob("ckpt-*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt, not a checkpoint: never load it
            notes.append(f"ignored unreadable checkpoint {path.name} ({type(exc).__name__})")
            continue
        if not isinstance(state, dict) or state.get("config_key") != config_key:
            notes.append(f"ignored checkpoint {path.name} of another configuration")
            continue
        return state, "; ".join(notes)
    return None, "; ".join(notes)


def save_model(workdir: Path, model: nn.Module) -> Path:
    """The backbone's state_dict as `model.pt` (loadable with `model.init`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "model.pt"
    _atomic_save(_unwrapped(model).state_dict(), path)
    return path


def load_init(model: nn.Module, path: str, ignore: list[str]) -> str:
    """Load pretrained weights into `model`, strictly; returns the file's SHA-256 (first 16 hex).

    `path` holds a state_dict, a hembench `model.pt`, or a hembench checkpoint (its `model`
    entry). Keys matching an `ignore` pattern (fnmatch) are neither loaded nor required. Any
    other missing, unexpected or mis-shaped key is an error that lists them.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"model.init: no such file {path}") from None
    except Exception as exc:
        raise ValueError(f"model.init: {path} is not a torch state_dict file ({exc})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.init: {path} holds no state_dict (a dict of tensors)")

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)

    target = _unwrapped(model)
    own = {k: v for k, v in target.state_dict().items() if not ignored(k)}
    given = {k: v for k, v in state.items() if not ignored(k)}
    missing = sorted(own.keys() - given.keys())
    unexpected = sorted(given.keys() - own.keys())
    shapes = sorted(
        f"{k} {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own.keys() & given.keys()
        if given[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = [
            f"{what}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        ]
        raise ValueError(
            f"model.init {path} does not fit model: {'; '.join(parts)} "
            "(skip keys with model.init_ignore = ['pattern.*'])"
        )
    target.load_state_dict(given, strict=False)
    return hashlib.sha256(raw).hexdigest()[:16]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module under torch.compile / DistributedDataParallel wrappers."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)
