"""Live tensor bytes on the CPU: the CPU analogue of the CUDA caching allocator's peak.

`LiveTensorBytes` is a `TorchDispatchMode` that follows every tensor storage on one device:
storages that exist when it starts are registered with `hold` (the training state and the
batch, found by `state_tensors`), every storage an op allocates inside the mode is added when
it is created, and each is subtracted when it is freed (a weakref finalizer on the storage's
Python object, which torch keeps alive exactly as long as the storage itself). `live` is the
bytes of the storages alive now, `peak` the highest `live` seen. Views and in-place results
share an input's storage and are not counted again; a storage counted twice is impossible (one
entry per StorageImpl).

Exact for what it counts (storage bytes, not allocator rounding or fragmentation), deterministic,
and independent of what else the process holds (the dataset, imported libraries, freed pages
the allocator keeps: what RSS mixes in). It costs a Python call per op, so it is used on probe
steps outside the timed ones (`harness.train.Trainer.measure_live`), never while timing.

Not counted: memory that is no tensor storage (kernels' scratch buffers, BLAS workspaces,
Python objects), storages created by other threads (DataLoader workers) unless `hold` is given
them, and storages of tensors from `torch.from_numpy` (not created by an op) unless held.
"""

from __future__ import annotations

import types
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20
_ATOMS = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType)


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages on `device` (see the module docstring).

    Usage: `t = LiveTensorBytes(); t.hold(state_tensors(model, optimizer)); with t: step()`,
    then `t.peak` (bytes). `hold` may be called again between steps (already counted storages
    are skipped); the counts stay right outside the mode too (frees are seen by finalizers).
    The storages of `ignore` (the dataset) and their views are never counted.
    """

    def __init__(
        self, device: torch.device | str = "cpu", ignore: Iterable[torch.Tensor] = ()
    ) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # StorageImpl address -> bytes, of the live storages
        # storages never counted (the dataset): a view of them (a probe set) costs nothing
        self._ignored = {_key(t) for t in ignore}

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count the storages of existing `tensors` as live (until they are freed)."""
        for t in tensors:
            self._track(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _key(t)
            if key in inputs:  # a view or an in-place result: an input's storage, maybe resized
                self._resized(t, key)
            else:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if t.device != self.device or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes or key in self._ignored:
            return
        self._sizes[key] = storage.nbytes()
        self._add(self._sizes[key])
        # torch keeps a storage's Python object alive as long as the storage: this fires on free
        weakref.finalize(storage, self._free, key)

    def _resized(self, t: torch.Tensor, key: int) -> None:
        """An op that grows a counted storage in place (`resize_`, an `out=` argument)."""
        if key in self._sizes and t.layout == torch.strided:
            grown = t.untyped_storage().nbytes() - self._sizes[key]
            if grown:
                self._sizes[key] += grown
                self._add(grown)

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage: the address of its StorageImpl (0 for sparse tensors)."""
    if t.layout != torch.strided:
        return 0
    return t.untyped_storage()._cdata


def state_tensors(*roots: Any, exclude: Iterable[Any] = ()) -> list[torch.Tensor]:
    """Every tensor reachable from `roots`, and the `.grad` of each leaf among them.

    Follows what training state is made of: modules (their parameters, buffers, submodules and
    attributes), optimisers (state and param groups), containers (dict keys and values, lists,
    tuples, sets, deques), objects' attributes (`__dict__`, `__slots__`), bound methods' objects
    and closures' cells. It never enters modules, classes or functions' globals (which would
    reach the whole interpreter), nor the objects in `exclude` (e.g. the dataset).
    """
    seen = {id(x) for x in exclude}
    found: list[torch.Tensor] = []
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _ATOMS):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
            continue
        stack.extend(_referents(obj))
    return found


def _referents(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return list(obj)
    if isinstance(obj, types.FunctionType):
        return [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    refs = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if isinstance(name, str) and hasattr(obj, name):
                refs.append(getattr(obj, name))
    return refs


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True
