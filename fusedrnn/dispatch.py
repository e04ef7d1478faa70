"""The one place that maps (requested name, layer spec) to a backend, once per spec.

The backends are imported here, so a reader following imports sees every one of them
(the Triton backend imports Triton itself only when it first runs a kernel).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

from .backend import cpu, cuda, reference, triton
from .backend.base import Backend, LayerSpec

log = logging.getLogger("fusedrnn")

_REGISTRY: Dict[str, Backend] = {
    "reference": reference.BACKEND,
    "cpu": cpu.BACKEND,
    "triton:persistent": triton.PERSISTENT,
    "triton:alternating": triton.ALTERNATING,
    "cuda:persistent": cuda.PERSISTENT,
    "cuda:pointwise": cuda.POINTWISE,
}

# What "auto" tries, best first, per device type. It always ends in "reference".
# CUDA: measured on an H200 (bench/gpu/gpu_check.md, fp32 seed shapes, fwd and fwd+bwd).
# Where the Triton persistent kernel fits (hidden <= 64 for an LSTM) it was the fastest of
# ours in 6 of the 8 (shape, cell, pass) cases; elsewhere the CUDA persistent kernel was in
# all cases but one (GRU forward at B 128, H 500: triton:alternating). The per-step paths
# were about even. torch.nn (cuDNN) was faster than all of them at the seed shapes but ptb.
_AUTO_ORDER: Dict[str, List[str]] = {
    "cpu": ["cpu", "reference"],
    "cuda": ["triton:persistent", "cuda:persistent", "cuda:pointwise", "triton:alternating",
             "reference"],
}

# Names that stand for a list of concrete backends, tried in order.
_ALIASES: Dict[str, List[str]] = {
    # persistent where W_hh fits on chip, else the per-step path (the fallback is logged)
    "triton": ["triton:persistent", "triton:alternating"],
    # persistent where every block's W_hh slice fits on chip, else the per-step path
    "cuda": ["cuda:persistent", "cuda:pointwise"],
}

# (requested name, spec) -> the backend chosen: each layer configuration is resolved once
_chosen: Dict[Tuple[str, LayerSpec], Backend] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this layer here; the message says why."""


def backend_names() -> List[str]:
    return ["auto", *_ALIASES, *_REGISTRY]


def check_name(name: str) -> str:
    """Validate a ``backend=`` argument (at construction time)."""
    if name not in backend_names():
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_names()}")
    return name


def reason(name: str, spec: LayerSpec) -> Optional[str]:
    """Why the concrete backend ``name`` cannot run a layer of this spec here, or None."""
    backend = _REGISTRY[name]
    return backend.unavailable_reason() or backend.unsupported_reason(spec)


def _candidates(name: str, device_type: str) -> List[str]:
    if name == "auto":
        return _AUTO_ORDER.get(device_type, ["reference"])
    return _ALIASES.get(name, [name])


def select(name: str, spec: LayerSpec) -> Backend:
    """The backend that runs a layer of this spec, or BackendUnavailableError saying why not.
    The choice is made once per (name, spec) in a process; ``forget_choices`` starts over."""
    chosen = _chosen.get((name, spec))
    if chosen is None:
        chosen = _chosen[(name, spec)] = _choose(check_name(name), spec)
    return chosen


def _choose(name: str, spec: LayerSpec) -> Backend:
    candidates = _candidates(name, spec.device.type)
    reasons = []
    for candidate in candidates:
        why = reason(candidate, spec)
        if why is None:
            if candidate != candidates[0]:
                log.debug("backend %r: using %r (%s)", name, candidate, "; ".join(reasons))
            return _REGISTRY[candidate]
        reasons.append(f"{candidate}: {why}")
    raise BackendUnavailableError(
        f"backend {name!r} cannot run {spec.cell.name} (hidden {spec.hidden_size}, proj "
        f"{spec.proj_size}, {spec.dtype}) on {spec.device}: " + "; ".join(reasons))


def forget_choices() -> None:
    """Drops the cached choices, e.g. after changing TRITON_INTERPRET or the registry."""
    _chosen.clear()


def backends() -> Dict[str, str]:
    """Each backend's status on this machine: ``"available"`` or why it is not."""
    status = {}
    for name, backend in _REGISTRY.items():
        why = backend.unavailable_reason()
        status[name] = "available" if why is None else f"unavailable: {why}"
    return status
