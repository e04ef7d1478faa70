"""The shared task harness: flags and presets, the training loop, logs, plot and summary.

A task (``tasks/copy.py``, ``tasks/adder.py``) subclasses :class:`Task` and calls
``main(task)``. The model is always built from torch.nn layers under ``torch.manual_seed``
and, with ``--fused``, converted by ``fusedrnn.convert`` afterwards, so a fused run and a
torch.nn run of the same seed start from identical weights and see identical batches.
Which fusedrnn backend runs is decided by ``fusedrnn`` alone (``--backend``, default auto).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

import fusedrnn
from fusedrnn import dispatch

RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "adagrad")

# Defaults every task shares; a task's ``defaults`` and then its preset override them, and
# flags given on the command line override both.
COMMON_DEFAULTS = dict(
    fused=False, backend="auto", cell="lstm", layers=1, hidden=128, optimizer="adam", lr=1e-3,
    iters=1000, epochs=None, batch_size=64, seed=0, device="cpu", data_dir=None, out=None,
    threads=1, eval_every=100, log_every=10, clip=0.0, lr_schedule="fixed", min_lr=1e-3,
    factor=0.5, patience=2, compare=False, progress=None, plot=True, resume=False,
    weight_decay=0.0, chrono_init=0,
)


class Task:
    """What a task supplies to the harness. Batches are dicts of tensors on ``device``."""

    name = ""
    description = ""
    defaults: Dict = {}
    presets: Dict[str, Dict] = {}
    default_preset = "quick"
    epoch_iters = 100  # generated data has no epochs: ``--epochs N`` means N * epoch_iters steps

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task-specific flags; give them ``default=None`` so presets can fill them in."""

    def build(self, cfg: Dict) -> nn.Module:
        """The model, built with torch.nn recurrent layers from ``make_rnn``."""
        raise NotImplementedError

    def sample(self, cfg: Dict, gen: torch.Generator, device: torch.device) -> Dict:
        """One training batch."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Dict):
        """``(mean loss tensor, {"acc": float, ...})`` for one batch, teacher forced if any."""
        raise NotImplementedError

    def test_sets(self, cfg: Dict, gen: torch.Generator, device: torch.device) -> Dict[str, Dict]:
        """Fixed evaluation batches by name."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, cfg: Dict, batch: Dict) -> Dict[str, float]:
        """Metrics (``loss``, ``acc``, ...) of one test batch; runs under ``torch.no_grad``."""
        raise NotImplementedError

    def log_line(self, name: str, step: int, metrics: Dict[str, float], cfg: Dict) -> str:
        return f"{name}, iterations: {step}, " + ", ".join(
            f"test_{k}: {_fmt(k, v)}" for k, v in metrics.items())


def _fmt(key: str, value: float) -> str:
    return f"{100 * value:.1f}%" if "acc" in key else f"{value:.4f}"


def make_rnn(cfg: Dict, input_size: int) -> nn.Module:
    """The torch.nn recurrent stack named by ``--cell/--hidden/--layers`` (time-major)."""
    rnn = RNN_CLASSES[cfg["cell"]](input_size, cfg["hidden"], num_layers=cfg["layers"])
    if cfg.get("chrono_init"):
        chrono_init_(rnn, cfg["chrono_init"])
    return rnn


def chrono_init_(rnn: nn.Module, t_max: float) -> None:
    """Tallec & Ollivier's chrono initialisation (ICLR 2018): gate biases that give each unit
    a memory time scale drawn uniformly from [1, t_max - 1] (the bias is its log).

    LSTM: forget bias log(U(1, t_max - 1)) and input bias its negative. GRU: the update gate
    (the share of the old state kept) gets the forget bias. The ``bias_hh`` halves are zeroed
    so the sum is the drawn value.
    """
    if t_max <= 2:
        raise ValueError(f"--chrono-init needs a time scale above 2, got {t_max}")
    if not isinstance(rnn, (nn.LSTM, nn.GRU)) or not rnn.bias:
        raise ValueError("--chrono-init applies to LSTM and GRU layers with biases")
    h = rnn.hidden_size
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if not name.startswith("bias_"):
                continue
            keep = slice(h, 2 * h)  # LSTM gates i, f, g, o; GRU gates r, z, n
            if name.startswith("bias_hh"):
                param[keep].zero_()
                if isinstance(rnn, nn.LSTM):
                    param[:h].zero_()
                continue
            param[keep] = torch.log(torch.empty(h).uniform_(1, t_max - 1))
            if isinstance(rnn, nn.LSTM):
                param[:h] = -param[keep]


def make_optimizer(cfg: Dict, params) -> torch.optim.Optimizer:
    """The seed reports' optimizers; momentum is Nesterov 0.9 and RMSProp is TF's (decay 0.9,
    momentum 0.9), as in the copy report. ``--weight-decay`` is torch's L2 term, decoupled
    (AdamW) for Adam."""
    name, lr, wd = cfg["optimizer"], cfg["lr"], cfg.get("weight_decay", 0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=0.9, eps=1e-6,
                                   weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def recurrent_backends(model: nn.Module) -> List[str]:
    """Which backend each fusedrnn layer resolves to here (reporting only), else ["torch.nn"]."""
    names = [fusedrnn.resolved_backend(m) for m in model.modules()
             if isinstance(m, (fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN))]
    return sorted(set(names)) or ["torch.nn"]


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
    g.add_argument("--lr-schedule", choices=("fixed", "plateau", "cosine"), default=None,
                   help="plateau: ReduceLROnPlateau on the train loss at every eval; "
                   "cosine: anneal to --min-lr over the run")
    g.add_argument("--min-lr", type=float, default=None, help="plateau floor / cosine end")
    g.add_argument("--factor", type=float, default=None, help="plateau decay factor")
    g.add_argument("--patience", type=int, default=None, help="plateau patience (evals)")
    g.add_argument("--clip", type=float, default=None, help="gradient norm clip (0: off)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="L2 weight decay (decoupled, AdamW, with adam; default 0)")
    g.add_argument("--chrono-init", type=float, default=None, metavar="T",
                   help="LSTM/GRU gate biases from chrono initialisation with time scales up "
                   "to T steps (default off: torch.nn's init)")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--iters", type=int, default=None, help="training steps")
    steps.add_argument("--epochs", type=int, default=None,
                       help=f"training length in epochs of {task.epoch_iters} generated batches")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    g.add_argument("--log-every", type=int, default=None, help="steps between train-metric logs")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 1: these models gain little from more "
                   "and lose much on shared cores; 0 keeps torch's default)")
    g.add_argument("--data-dir", default=None, help="shared data (default $FUSEDRNN_DATA "
                   "or ../shared/data); unused by generated-data tasks")
    g.add_argument("--out", default=None, help="output directory (default runs/<task>/<name>)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its last checkpoint (written at every "
                   "evaluation), e.g. a long run split over several sessions; --iters may grow")
    g.add_argument("--compare", action="store_true", default=None,
                   help="run torch.nn then fused from the same seed and print the speed ratio")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="force the progress bar on (default: only on a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=None)
    task.add_arguments(p.add_argument_group(task.name))
    return p


def _preset_summary(cfg: Dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "about")


def resolve_config(task: Task, argv: Optional[List[str]] = None) -> Dict:
    """common defaults < task defaults < preset < explicit flags."""
    args = build_parser(task).parse_args(argv)
    preset = args.preset or task.default_preset
    cfg = {**COMMON_DEFAULTS, **task.defaults, **task.presets[preset]}
    cfg.pop("about", None)
    cfg.update({k: v for k, v in vars(args).items() if v is not None})
    cfg["preset"] = preset
    if cfg.get("epochs"):
        cfg["iters"] = cfg["epochs"] * task.epoch_iters
    return cfg


class _Log:
    """JSON-lines metrics log plus an in-memory copy for the plot and the results file.
    ``records`` carries on a resumed run's log (those up to its checkpoint)."""

    def __init__(self, path: Path, records: Optional[List[Dict]] = None):
        self.file = open(path, "w")
        self.records: List[Dict] = []
        for record in records or []:
            self.write(**record)

    def write(self, **record) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _default_out(task: Task, cfg: Dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "fused" if cfg["fused"] else "torch"
    return Path("runs") / task.name / f"{cfg['preset']}-{kind}-{stamp}"


def train(task: Task, cfg: Dict) -> Dict:
    """Train one model as ``cfg`` says; write log, results and plot under ``cfg['out']``."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    out = Path(cfg["out"] or _default_out(task, cfg))
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "out": str(out)}

    torch.manual_seed(cfg["seed"])
    model = task.build(cfg)
    if cfg["fused"]:
        model = fusedrnn.convert(model, backend=cfg["backend"])
    model.to(device)
    backends = recurrent_backends(model)
    optimizer = make_optimizer(cfg, model.parameters())
    plateau = cosine = None
    if cfg["lr_schedule"] == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=cfg["factor"], patience=cfg["patience"], min_lr=cfg["min_lr"])
    elif cfg["lr_schedule"] == "cosine":
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=cfg["iters"], eta_min=cfg["min_lr"])
    train_gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    tests = task.test_sets(cfg, torch.Generator().manual_seed(cfg["seed"] + 2), device)
    schedulers = [s for s in (plateau, cosine) if s is not None]

    checkpoint_path = out / "checkpoint.pt"
    resumed = None
    if cfg["resume"]:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        resumed = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        for sched, state in zip(schedulers, resumed["schedulers"]):
            sched.load_state_dict(state)
        train_gen.set_state(resumed["train_gen"])
        torch.set_rng_state(resumed["torch_rng"])
    log = _Log(out / "metrics.jsonl", resumed and resumed["records"])
    n_params = sum(p.numel() for p in model.parameters())
    header = (f"tasks.{task.name} preset={cfg['preset']} "
              f"{'fused' if cfg['fused'] else 'torch.nn'} backend={','.join(backends)} "
              f"cell={cfg['cell']} layers={cfg['layers']} hidden={cfg['hidden']} "
              f"params={n_params} threads={torch.get_num_threads()} seed={cfg['seed']} -> {out}")
    print(header, flush=True)
    if resumed:
        print(f"resumed from {checkpoint_path} at step {resumed['step']}", flush=True)

    step = resumed["step"] if resumed else 0
    bar = tqdm(total=cfg["iters"], initial=step, desc=f"{task.name}", dynamic_ncols=True,
               disable=None if cfg["progress"] is None else not cfg["progress"], file=sys.stderr)
    window_loss, window_acc, window_n = resumed["window"] if resumed else (0.0, 0.0, 0)
    plateau_loss, plateau_n = 0.0, 0  # reset at every evaluation, so 0 at a checkpoint
    first_loss = resumed["first_loss"] if resumed else None
    last_eval: Dict[str, Dict[str, float]] = resumed["last_eval"] if resumed else {}
    eval_time = resumed["eval_time"] if resumed else 0.0
    start = time.perf_counter() - (resumed["elapsed"] if resumed else 0.0)
    status = "finished"

    def save_checkpoint(step: int) -> None:
        """Everything the loop needs to go on from ``step`` exactly as if it had not stopped."""
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                     schedulers=[sched.state_dict() for sched in schedulers],
                     train_gen=train_gen.get_state(), torch_rng=torch.get_rng_state(),
                     step=step, window=(window_loss, window_acc, window_n),
                     first_loss=first_loss, last_eval=last_eval,
                     eval_time=eval_time, elapsed=time.perf_counter() - start,
                     records=log.records)
        torch.save(state, out / "checkpoint.pt.tmp")
        os.replace(out / "checkpoint.pt.tmp", checkpoint_path)

    def run_eval(step: int) -> None:
        nonlocal eval_time
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            for name, batch in tests.items():
                metrics = task.evaluate(model, cfg, batch)
                last_eval[name] = metrics
                log.write(kind="test", step=step, name=name, **metrics)
                tqdm.write(task.log_line(name, step, metrics, cfg), file=sys.stdout)
        model.train()
        eval_time += time.perf_counter() - t0
        sys.stdout.flush()

    try:
        model.train()
        for step in range(step + 1, cfg["iters"] + 1):
            batch = task.sample(cfg, train_gen, device)
            loss, stats = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["clip"]:
                nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
            optimizer.step()
            if cosine is not None:
                cosine.step()
            value = loss.item()
            if not math.isfinite(value):
                status = f"diverged (loss {value}) at step {step}"
                break
            if first_loss is None:
                first_loss = value
                log.write(kind="first", step=1, loss=value)
            window_loss += value
            window_acc += stats["acc"]
            window_n += 1
            plateau_loss += value
            plateau_n += 1
            bar.update(1)
            if step % cfg["log_every"] == 0 or step == cfg["iters"]:
                lr = optimizer.param_groups[0]["lr"]
                log.write(kind="train", step=step, loss=window_loss / window_n,
                          acc=window_acc / window_n, lr=lr,
                          elapsed=time.perf_counter() - start)
                bar.set_postfix(loss=f"{window_loss / window_n:.4f}",
                                acc=f"{100 * window_acc / window_n:.1f}%", lr=f"{lr:.2g}")
                window_loss, window_acc, window_n = 0.0, 0.0, 0
            if step % cfg["eval_every"] == 0 or step == cfg["iters"]:
                if plateau is not None:
                    plateau.step(plateau_loss / plateau_n)
                plateau_loss, plateau_n = 0.0, 0
                run_eval(step)
                _write_results(out, task, cfg, backends, n_params, log, last_eval, step,
                               time.perf_counter() - start, eval_time, "running")
                save_checkpoint(step)
    except KeyboardInterrupt:
        status = f"interrupted at step {step}"
    finally:
        bar.close()
    wall = time.perf_counter() - start
    results = _write_results(out, task, cfg, backends, n_params, log, last_eval, step, wall,
                             eval_time, status)
    log.close()
    if cfg["plot"]:
        results["plot"] = str(plot_curves(log.records, out / "curves.png", title=header.split(" ->")[0]))
    print_summary(results)
    return results


def _write_results(out: Path, task: Task, cfg: Dict, backends: List[str], n_params: int,
                   log: _Log, last_eval: Dict, step: int, wall: float, eval_time: float,
                   status: str) -> Dict:
    train_time = max(wall - eval_time, 1e-9)
    first = next((r["loss"] for r in log.records if r["kind"] == "first"), None)
    last_train = next((r for r in reversed(log.records) if r["kind"] == "train"), None)
    results = dict(
        task=task.name, status=status, config=cfg, backends=backends, params=n_params,
        torch=torch.__version__, threads=torch.get_num_threads(), steps=step,
        wall_time_s=round(wall, 2), train_time_s=round(train_time, 2),
        steps_per_s=round(step / train_time, 3), first_loss=first,
        final_train=last_train, test=last_eval,
        results_file=str(out / "results.json"), metrics_log=str(out / "metrics.jsonl"))
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    return results


def plot_curves(records: List[Dict], path: Path, title: str = "") -> Path:
    """Train and test loss/accuracy against steps, like the reports' TensorBoard figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    train = [r for r in records if r["kind"] == "train"]
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], label="train", alpha=0.7)
        ax_acc.plot(steps, [100 * r["acc"] for r in train], label="train", alpha=0.7)
    for name in dict.fromkeys(r["name"] for r in records if r["kind"] == "test"):
        pts = [r for r in records if r["kind"] == "test" and r["name"] == name]
        steps = [r["step"] for r in pts]
        ax_loss.plot(steps, [r["loss"] for r in pts], marker=".", label=name)
        ax_acc.plot(steps, [100 * r["acc"] for r in pts], marker=".", label=name)
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="iteration", ylabel="loss", title="loss")
    ax_acc.set(xlabel="iteration", ylabel="accuracy (%)", title="accuracy", ylim=(0, 101))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_summary(results: Dict) -> None:
    cfg = results["config"]
    rows = [(name, m) for name, m in results["test"].items()]
    keys = list(dict.fromkeys(k for _, m in rows for k in m))
    width = max([len("test set")] + [len(n) for n, _ in rows])
    print()
    print(f"{'test set':<{width}}  " + "  ".join(f"{k:>10}" for k in keys))
    for name, m in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{_fmt(k, m[k]) if k in m else '':>10}" for k in keys))
    kind = "fused" if cfg["fused"] else "torch.nn"
    first = results["first_loss"]
    print(f"\n{results['status']}: {results['steps']} steps in {results['wall_time_s']:.1f} s "
          f"({results['steps_per_s']:.2f} steps/s training), {kind} backend="
          f"{','.join(results['backends'])}, threads={results['threads']}"
          + (f", first loss {first:.4f}" if first is not None else ""))
    print(f"results: {results['results_file']}\nmetrics: {results['metrics_log']}")
    if "plot" in results:
        print(f"plot:    {results['plot']}")
    sys.stdout.flush()


def compare(task: Task, cfg: Dict) -> Dict[str, Dict]:
    """torch.nn then fused from the same seed and batches; prints both and the speed ratio."""
    out = Path(cfg["out"] or _default_out(task, {**cfg, "fused": True}).with_name(
        f"{cfg['preset']}-compare-{time.strftime('%Y%m%d-%H%M%S')}"))
    runs = {}
    for kind, fused in (("torch", False), ("fused", True)):
        runs[kind] = train(task, {**cfg, "fused": fused, "out": str(out / kind)})
    t, f = runs["torch"], runs["fused"]
    print(f"\n{'':<10} {'first loss':>12} {'steps/s':>10} {'wall s':>9}  final test accuracy")
    for kind, r in (("torch.nn", t), ("fused", f)):
        accs = ", ".join(f"{n} {_fmt('acc', m['acc'])}" for n, m in r["test"].items())
        print(f"{kind:<10} {r['first_loss']:>12.6f} {r['steps_per_s']:>10.2f} "
              f"{r['wall_time_s']:>9.1f}  {accs}")
    ratio = f["steps_per_s"] / t["steps_per_s"]
    print(f"fused/torch.nn speed ratio: {ratio:.2f}x (fused backend {','.join(f['backends'])})")
    (out / "compare.json").write_text(json.dumps(
        {"speed_ratio_fused_over_torch": ratio, "torch": t["results_file"],
         "fused": f["results_file"]}, indent=2))
    return runs


def main(task: Task, argv: Optional[List[str]] = None):
    cfg = resolve_config(task, argv)
    if cfg["compare"]:
        return compare(task, cfg)
    return train(task, cfg)
