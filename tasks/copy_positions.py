"""Copy accuracy at each output position of a finished run, as a table and a plot: where along
a test sequence longer than the training length the model stops copying.

    python -m tasks.copy_positions runs/copy/NAME [--lengths 40,50,60] [--test-size 256]
                                              [--lead-pad P]

Reads the run's ``results.json`` (its config) and ``checkpoint.pt`` (its last weights), draws
fresh test sequences of each length (seed ``--seed``), decodes greedily and writes
``positions.png`` and ``positions.json`` into the run directory (``positions-leadpadP.*`` with
``--lead-pad P``: the sources come after P PADs).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .copy import TASK


def position_accuracy(run: Path, lengths, test_size: int = 256, seed: int = 1234,
                      lead_pad: int = 0):
    """{length: [accuracy at output position 1, 2, ...]} for the run's last checkpoint;
    ``lead_pad`` PADs come before each test source (packed runs only)."""
    cfg = {**TASK.defaults, **json.loads((run / "results.json").read_text())["config"],
           "test_lead_pad": lead_pad}
    model = TASK.build(cfg)
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["model"])
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for length in lengths:
            batch = TASK.test_sets(dict(cfg, test_lengths=str(length), test_size=test_size),
                                   gen, "cpu")
            (batch,) = batch.values()
            out[length] = TASK.greedy_hits(model, batch).float().mean(1).tolist()
    return cfg, out


def plot(cfg, acc, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for length, values in acc.items():
        ax.plot(range(1, len(values) + 1), [100 * v for v in values], label=f"test length {length}")
    ax.axvline(cfg["length"] + 0.5, color="gray", ls="--", lw=1, label="longest training length")
    ax.axhline(100 / cfg["vocab"], color="gray", ls=":", lw=1, label="chance")
    ax.set(xlabel="output position", ylabel="greedy accuracy (%)", ylim=(0, 102),
           title=f"copy, {cfg['cell']} {cfg['hidden']}, {cfg['iters']} steps on lengths "
                 f"{cfg['min_length'] or cfg['length']}-{cfg['length']}"
                 + (", decoder reads GO" if cfg["decoder_input"] == "go" else "")
                 + (f", test after {cfg['test_lead_pad']} PADs" if cfg["test_lead_pad"] else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished copy run's --out directory")
    p.add_argument("--lengths", default="40,50,60", help="comma-separated test lengths")
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lead-pad", type=int, default=0, metavar="P",
                   help="test sources come after P PADs (runs trained with --packed)")
    args = p.parse_args(argv)
    cfg, acc = position_accuracy(args.run, [int(x) for x in args.lengths.split(",")],
                                 args.test_size, args.seed, args.lead_pad)
    for length, values in acc.items():
        blocks = [values[i:i + 10] for i in range(0, len(values), 10)]
        cells = "  ".join(f"{i * 10 + 1}-{i * 10 + len(b)}: {100 * sum(b) / len(b):5.1f} %"
                          for i, b in enumerate(blocks))
        print(f"length {length}: {cells}")
    name = f"positions-leadpad{args.lead_pad}" if args.lead_pad else "positions"
    (args.run / f"{name}.json").write_text(json.dumps({str(k): v for k, v in acc.items()}))
    plot(cfg, acc, args.run / f"{name}.png")
    print(f"plot: {args.run / name}.png")
    return acc


if __name__ == "__main__":
    main()
