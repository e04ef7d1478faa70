"""Flags and presets: common defaults < a task's defaults < its preset < explicit flags."""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

from fusedrnn import dispatch

from .task import OPTIMIZERS, RNN_CLASSES, Task

# Defaults every task shares; a task's ``defaults`` and then its preset override them, and
# flags given on the command line override both.
COMMON_DEFAULTS = dict(
    fused=False, backend="auto", cell="lstm", layers=1, hidden=128, optimizer="adam", lr=1e-3,
    betas=None, iters=1000, epochs=None, batch_size=64, seed=0, device="cpu", dtype="float32",
    data_dir=None,
    out=None, threads=1, eval_every=100, log_every=10, clip=0.0, clip_value=0.0, lr_schedule="fixed",
    min_lr=1e-3, factor=0.5, patience=2, plateau_on="train", decay_start=15, stop_after=0,
    momentum=0.0, compare=False, progress=None, plot=True,
    resume=False, weight_decay=0.0, l2_coupling="decoupled", chrono_init=0,
)


def build_parser(task: Task) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m tasks.{task.name}", description=task.description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets (flags given explicitly override them):\n" + "\n".join(
            f"  {name:<22} {cfg.get('about', '')}\n{'':<25}{_preset_summary(cfg)}"
            for name, cfg in task.presets.items())
        + f"\ndefault preset: {task.default_preset}")
    g = p.add_argument_group("common")
    g.add_argument("--preset", choices=sorted(task.presets), default=None,
                   help=f"named configuration (default {task.default_preset})")
    g.add_argument("--fused", action="store_true", default=None,
                   help="use fusedrnn layers (converted from the torch.nn ones)")
    g.add_argument("--backend", default=None, choices=dispatch.backend_names(),
                   help="fusedrnn backend with --fused (default auto)")
    g.add_argument("--cell", choices=sorted(RNN_CLASSES), default=None)
    g.add_argument("--layers", type=int, default=None)
    g.add_argument("--hidden", type=int, default=None)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="Adam's betas (default 0.9 0.999)")
    g.add_argument("--lr-schedule", choices=("fixed", "plateau", "cosine", "decay"),
                   default=None,
                   help="plateau: ReduceLROnPlateau at every eval (on --plateau-on); "
                   "cosine: anneal to --min-lr over the run; decay: --lr for --decay-start "
                   "epochs, then times --factor after each epoch (Zaremba et al.)")
    g.add_argument("--min-lr", type=float, default=None, help="plateau floor / cosine end")
    g.add_argument("--factor", type=float, default=None,
                   help="plateau decay factor / decay's factor per epoch")
    g.add_argument("--patience", type=int, default=None, help="plateau patience (evals)")
    g.add_argument("--plateau-on", choices=("train", "best"), default=None,
                   help="what the plateau schedule watches: the train loss (default) or the "
                   "test metric that picks the best weights (a validation set)")
    g.add_argument("--decay-start", type=int, default=None,
                   help="decay: epochs at the initial lr (default 15)")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop when the test metric that picks the best weights has not "
                   "improved in N evaluations (0: never, the default)")
    g.add_argument("--momentum", type=float, default=None,
                   help="sgd's (classical) momentum (default 0)")
    g.add_argument("--clip", type=float, default=None, help="gradient norm clip (0: off)")
    g.add_argument("--clip-value", type=float, default=None, metavar="V",
                   help="clip every gradient element to [-V, V] (0: off)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="L2 weight decay (default 0)")
    g.add_argument("--l2-coupling", choices=("decoupled", "coupled"), default=None,
                   help="with adam: decoupled (AdamW, default) or coupled (Adam's own "
                   "weight_decay: an L2 term in the gradient, what 'L2 regularisation' says)")
    g.add_argument("--chrono-init", type=float, default=None, metavar="T",
                   help="LSTM/GRU gate biases from chrono initialisation with time scales up "
                   "to T steps (default off: torch.nn's init)")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--iters", type=int, default=None, help="training steps")
    steps.add_argument("--epochs", type=int, default=None,
                       help="training length in epochs (passes over a dataset; for generated "
                       f"data, {task.epoch_iters} batches)")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (0: at the end of every epoch)")
    g.add_argument("--log-every", type=int, default=None, help="steps between train-metric logs")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="the model's and the data's floating-point type (default float32)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 1: these models gain little from more "
                   "and lose much on shared cores; 0 keeps torch's default)")
    g.add_argument("--data-dir", default=None, help="where the datasets are (default "
                   "$FUSEDRNN_DATA or ../shared/data); unused by generated-data tasks")
    g.add_argument("--out", default=None, help="output directory (default runs/<task>/<name>)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its last checkpoint (written at every "
                   "evaluation), e.g. a long run split over several sessions; --iters may grow")
    g.add_argument("--compare", action="store_true", default=None,
                   help="run torch.nn then fused from the same seed, print the speed ratio and "
                   "plot both runs' curves on the same axes")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="force the progress bar on (default: only on a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=None)
    task.add_arguments(p.add_argument_group(task.name))
    return p


def _preset_summary(cfg: Dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "about")


def resolve_config(task: Task, argv: Optional[List[str]] = None) -> Dict:
    """common defaults < task defaults < preset < explicit flags. For generated data,
    ``--epochs N`` becomes N * ``epoch_iters`` steps here; a dataset's epochs become steps
    once its size is known (the training loop)."""
    args = build_parser(task).parse_args(argv)
    preset = args.preset or task.default_preset
    cfg = {**COMMON_DEFAULTS, **task.defaults, **task.presets[preset]}
    cfg.pop("about", None)
    cfg.update({k: v for k, v in vars(args).items() if v is not None})
    if args.iters is not None:
        cfg["epochs"] = None  # an explicit --iters wins over a preset's epochs
    cfg["preset"] = preset
    if cfg.get("epochs") and not task.dataset:
        cfg["iters"] = cfg["epochs"] * task.epoch_iters
    return cfg
