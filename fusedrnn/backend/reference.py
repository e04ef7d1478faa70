"""The oracle: a plain torch time loop over the cell registry, differentiated by autograd."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, LayerArgs, step_rows


def run_sequence(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, extras=None):
    sizes, offsets = step_rows(batch_sizes)
    h, c = h0, c0
    ys = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n = sizes[t]
        h_prev = h[:n]
        c_prev = c[:n] if c is not None else None
        h_new, c_new = cell.step(xp[offsets[t]:offsets[t] + n], F.linear(h_prev, w_hh, b_hh),
                                 h_prev, c_prev, **(extras or {}))
        if w_hr is not None:
            h_new = F.linear(h_new, w_hr)
        ys[t] = h_new
        # rows past n keep their state: ended sequences (forward) or not yet started (reverse)
        h = h_new if n == h.shape[0] else torch.cat([h_new, h[n:]])
        if c is not None:
            c = c_new if n == c.shape[0] else torch.cat([c_new, c[n:]])
    return torch.cat(ys), h, c


def run_layer(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """``Backend.layer`` in plain torch ops, on flat arguments; with ``w_ih`` None, x is
    already the projection. The kernel backends differentiate this for everything their
    fused backward does not give (see ``backend/transforms.py``)."""
    xp = x if w_ih is None else F.linear(x, w_ih, b_ih)
    return run_sequence(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse)


class ReferenceBackend(Backend):
    name = "reference"

    def unsupported_reason(self, spec):
        """Takes a cell's extra parameters (passed to its ``step`` by name); no masks yet."""
        if spec.masks:
            return f"masks are not implemented yet ({', '.join(sorted(spec.masks))})"
        return None

    def sequence(self, xp, args: LayerArgs):
        return run_sequence(args.cell, xp, args.batch_sizes, args.h0, args.c0, args.w_hh,
                            args.b_hh, args.w_hr, args.reverse, args.extras)


BACKEND = ReferenceBackend()
