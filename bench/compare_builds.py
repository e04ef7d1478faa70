"""A/B of two builds of fusedrnn on the seed shapes: torch.nn vs ``cpu`` ratios, min of rounds.

    WT=/path/to/checkout-a python bench/compare_builds.py LSTM:adder200:fwdbwd GRU:copy:fwd ...
    WT=/path/to/checkout-b python bench/compare_builds.py LSTM:adder200:fwdbwd GRU:copy:fwd ...

Each argument is KIND:SHAPE:MODE (MODE fwd or fwdbwd). WT names the checkout (with its extension
built in place) whose fusedrnn is imported. Run the two checkouts alternately, several times:
on a shared machine only ratios taken close together compare. REPS sets the rounds (default 8).
"""
import os
import sys
import time

import torch

CHECKOUT = os.environ.get("WT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, CHECKOUT)
sys.path.insert(0, os.path.join(CHECKOUT, "bench"))
import fusedrnn  # noqa: E402
from shapes import SEED_SHAPES, run_layer  # noqa: E402

# its own table, not shapes.KINDS: the script imports the bench/ of either checkout, old ones too
LAYERS = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}


def main(specs):
    torch.set_num_threads(int(os.environ.get("FUSEDRNN_BENCH_THREADS", "2")))
    out = []
    for spec in specs:
        kind, shape, mode = spec.split(":")
        T, B, I, H, L = SEED_SHAPES[shape]
        torch.manual_seed(0)
        models = {"nn": LAYERS[kind](I, H, L),
                  "cpu": fusedrnn.convert(LAYERS[kind](I, H, L), backend="cpu")}
        x = torch.randn(T, B, I)
        best = {}
        for rep in range(int(os.environ.get("REPS", "8"))):
            for name, m in models.items():  # alternated, so both see the same machine
                if rep == 0:
                    run_layer(m, x, mode)
                t = time.perf_counter()
                run_layer(m, x, mode)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        out.append(f"{spec}: nn {best['nn'] * 1e3:.2f} ms, cpu {best['cpu'] * 1e3:.2f} ms, "
                   f"x{best['nn'] / best['cpu']:.2f}")
    print(os.path.basename(os.path.abspath(CHECKOUT)), " | ".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
