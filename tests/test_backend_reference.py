"""The reference backend's own checks: gradcheck, and the packed-state semantics."""
import pytest
import torch

from fusedrnn.backend.reference import BACKEND
from fusedrnn.cells import CELLS
from sequence_check import gradcheck_sequence, random_batch_sizes, run_sequence, sequence_inputs


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(rng, cell_name, reverse):
    assert gradcheck_sequence(BACKEND, rng, cell_name, reverse)


@pytest.mark.parametrize("cell_name", list(CELLS))
def test_packed_rows_match_separate_runs(rng, cell_name):
    """Each packed sequence must give what it gives alone: the count semantics are right."""
    cell = CELLS[cell_name]
    batch_sizes = random_batch_sizes(rng, 5, 4, packed=True)
    args = sequence_inputs(cell, batch_sizes, hidden=3)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), batch_sizes.cumsum(0)])
    for reverse in (False, True):
        y, h, c = run_sequence(BACKEND, cell, args, reverse)
        for b in range(int(batch_sizes[0])):
            steps = int((batch_sizes > b).sum())
            rows = offsets[:steps] + b
            alone = dict(args, xp=args["xp"][rows], batch_sizes=torch.ones(steps, dtype=torch.int64),
                         h0=args["h0"][b:b + 1],
                         c0=args["c0"][b:b + 1] if args["c0"] is not None else None)
            y1, h1, c1 = run_sequence(BACKEND, cell, alone, reverse)
            torch.testing.assert_close(y[rows], y1, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(h[b:b + 1], h1, rtol=1e-12, atol=1e-12)
            if c is not None:
                torch.testing.assert_close(c[b:b + 1], c1, rtol=1e-12, atol=1e-12)
