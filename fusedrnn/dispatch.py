"""The one place that maps (requested name, device, dtype, cell, sizes) to a backend."""
from __future__ import annotations

import importlib
import logging
from typing import Dict, List, Optional

import torch

from .backend.base import Backend
from .cells import Cell

log = logging.getLogger("fusedrnn")

# name -> "module:attribute"; modules are imported on first use so that e.g. Triton is
# only imported when asked for (TRITON_INTERPRET must be set before that import).
_REGISTRY: Dict[str, str] = {
    "reference": "fusedrnn.backend.reference:BACKEND",
    "cpu": "fusedrnn.backend.cpu:BACKEND",
    "triton:persistent": "fusedrnn.backend.triton:PERSISTENT",
    "triton:alternating": "fusedrnn.backend.triton:ALTERNATING",
}

# What "auto" tries, best first, per device type. It always ends in "reference".
_AUTO_ORDER: Dict[str, List[str]] = {
    "cpu": ["cpu", "reference"],
    "cuda": ["triton:persistent", "triton:alternating", "reference"],
}

# Names that stand for a list of concrete backends, tried in order.
_ALIASES: Dict[str, List[str]] = {
    # persistent where W_hh fits on chip, else the per-step path (the fallback is logged)
    "triton": ["triton:persistent", "triton:alternating"],
}

_loaded: Dict[str, Backend] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this layer here; the message says why."""


def backend_names() -> List[str]:
    return ["auto", *_ALIASES, *_REGISTRY]


def _load(name: str) -> Backend:
    if name not in _loaded:
        module, attr = _REGISTRY[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), attr)
    return _loaded[name]


def _reason(name: str, device: torch.device, dtype: torch.dtype, cell: Cell,
            hidden_size: int, proj_size: int) -> Optional[str]:
    try:
        backend = _load(name)
    except ImportError as exc:  # an optional dependency is missing
        return f"cannot import: {exc}"
    return backend.unavailable_reason() or backend.unsupported_reason(
        device, dtype, cell, hidden_size, proj_size)


def _candidates(name: str, device_type: str) -> List[str]:
    if name == "auto":
        return _AUTO_ORDER.get(device_type, ["reference"])
    return _ALIASES.get(name, [name])


def _validate(name: str) -> None:
    if name not in backend_names():
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_names()}")


def check_name(name: str) -> str:
    """Validate a ``backend=`` argument at construction time, and import the backends it can
    pick on this machine's devices now, so that a forward traced by torch.compile never has to
    import one (Dynamo cannot trace ``importlib``)."""
    _validate(name)
    for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        for candidate in _candidates(name, device_type):
            try:
                _load(candidate)
            except ImportError:  # an optional dependency: select() will say why
                pass
    return name


def select(name: str, device: torch.device, dtype: torch.dtype, cell: Cell,
           hidden_size: int, proj_size: int = 0) -> Backend:
    """The backend that runs this layer, or BackendUnavailableError saying why not."""
    _validate(name)
    candidates = _candidates(name, device.type)
    reasons = []
    for candidate in candidates:
        reason = _reason(candidate, device, dtype, cell, hidden_size, proj_size)
        if reason is None:
            if candidate != candidates[0]:
                log.debug("backend %r: using %r (%s)", name, candidate, "; ".join(reasons))
            return _load(candidate)
        reasons.append(f"{candidate}: {reason}")
    raise BackendUnavailableError(
        f"backend {name!r} cannot run {cell.name} (hidden {hidden_size}, proj {proj_size}, "
        f"{dtype}) on {device}: " + "; ".join(reasons))


def backends() -> Dict[str, str]:
    """Each backend's status on this machine: ``"available"`` or why it is not."""
    status = {}
    for name in _REGISTRY:
        try:
            reason = _load(name).unavailable_reason()
        except ImportError as exc:
            reason = f"cannot import: {exc}"
        status[name] = "available" if reason is None else f"unavailable: {reason}"
    return status
