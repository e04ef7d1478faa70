"""What a task supplies to the harness, and the model pieces every task shares.

A task subclasses :class:`Task` and calls ``main(task)``. The model is always built from
torch.nn layers under ``torch.manual_seed`` and, with ``--fused``, converted by
``fusedrnn.convert`` afterwards, so a fused run and a torch.nn run of the same seed start from
identical weights and see identical batches.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "adagrad")


@dataclass(frozen=True)
class Metric:
    """A number a task reports. ``kind`` decides how it is shown and plotted: "accuracy"
    (a fraction, shown as a percentage, plotted 0-100), "loss" (log scale), "perplexity"
    (log scale) or "value".

    A train metric with ``smoothing`` s is reported as the moving average the char-RNN
    literature calls the smooth loss: ``m = s * m + (1 - s) * value`` after every step,
    starting from the first step's value, instead of the mean since the last log line.
    A train metric with ``derive`` is computed at each log line from the other metrics' means
    (perplexity: the exponential of the mean loss, not the mean of per-batch perplexities)."""
    name: str
    kind: str = "value"
    smoothing: float = 0.0
    derive: Optional[Callable[[Dict[str, float]], float]] = None

    def format(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self.kind == "accuracy" else f"{value:.4f}"

    @property
    def higher_is_better(self) -> bool:
        return self.kind in ("accuracy", "value")


LOSS = Metric("loss", "loss")


class Task:
    """What a task supplies to the harness. Batches are dicts of tensors on ``device``.

    Data comes in one of two forms. A generated task (``dataset = False``) implements
    ``sample``: a fresh batch from a generator each step; ``--epochs N`` means N times
    ``epoch_iters`` steps. A dataset task (``dataset = True``) implements ``train_size`` and
    ``train_batch``: each epoch visits the examples once in a seeded random order, and
    ``--epochs`` counts real epochs.

    A task that carries its recurrent state across batches (truncated BPTT, language models)
    sets ``carries_state``; its ``loss`` then takes the previous batch's state (detached by
    the harness; None at the start of each epoch) and returns the new one third.
    """

    name = ""
    description = ""
    defaults: Dict = {}
    presets: Dict[str, Dict] = {}
    default_preset = "quick"
    dataset = False
    epoch_iters = 100          # generated data: steps per "epoch"
    carries_state = False
    # what ``loss`` returns besides the loss (train) and ``evaluate`` (test); the first
    # non-loss metric is the headline (progress bar, summary); "loss" is always reported
    train_metrics: Sequence[Metric] = (Metric("acc", "accuracy"),)
    test_metrics: Sequence[Metric] = (Metric("acc", "accuracy"),)
    # (test set, metric) that picks the best weights: the loop keeps them in best.pt and, at
    # the end, evaluates every test set with them (None: the last weights are the result)
    best_by: Optional[Tuple[str, str]] = None
    # the presets ``--preset grid`` runs in turn (a task with a grid has a "grid" preset)
    grid: Sequence[str] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task-specific flags; give them ``default=None`` so presets can fill them in."""

    def prepare(self, cfg: Dict) -> None:
        """Load or check what the task needs before the model is built (a dataset)."""

    def build(self, cfg: Dict) -> nn.Module:
        """The model, built with torch.nn recurrent layers from ``make_rnn``."""
        raise NotImplementedError

    def sample(self, cfg: Dict, gen: torch.Generator, device: torch.device) -> Dict:
        """One training batch of generated data."""
        raise NotImplementedError

    def train_size(self, cfg: Dict) -> int:
        """Examples in the training set (dataset tasks)."""
        raise NotImplementedError

    def items_per_step(self, cfg: Dict) -> Optional[Tuple[str, int]]:
        """(what, how many) one step trains on, e.g. ("words", 500): the log and the progress
        bar then show their rate (``words_per_s``)."""
        return None

    def epoch_order(self, cfg: Dict, gen: torch.Generator) -> torch.Tensor:
        """The order a dataset task visits its examples in one epoch (``batch_size`` of them
        per step): a fresh random permutation unless the task reads in another order."""
        return torch.randperm(self.train_size(cfg), generator=gen)

    def train_batch(self, cfg: Dict, index: torch.Tensor, device: torch.device) -> Dict:
        """The training batch of the examples at ``index`` (dataset tasks)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Dict, *state):
        """``(mean loss tensor, {train metric: float})`` for one batch, plus the new state
        when the task ``carries_state``."""
        raise NotImplementedError

    def test_sets(self, cfg: Dict, gen: torch.Generator, device: torch.device) -> Dict:
        """Fixed evaluation data by name."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, cfg: Dict, data) -> Dict[str, float]:
        """The test metrics (``loss`` and ``test_metrics``) of one test set, under no_grad."""
        raise NotImplementedError

    def after_evaluation(self, model: nn.Module, cfg: Dict, step: int) -> None:
        """Called after each evaluation, under no_grad in eval mode (a text sample, say)."""

    def finish(self, model: nn.Module, cfg: Dict, results: Dict) -> Dict:
        """Called once at the end with the best weights loaded (the last ones without
        ``best_by``); what it returns is added to results.json."""
        return {}

    def write_grid(self, out, results: Dict[str, Dict]) -> None:
        """The grid's table and figure in ``out`` from each preset's results.json."""
        raise NotImplementedError

    def train_log_line(self, step: int, record: Dict[str, float], cfg: Dict) -> Optional[str]:
        """A line printed before each evaluation's, from the last train log record (the
        char-RNN's smooth loss, the language model's perplexity and words/s); None: none."""
        return None

    def log_line(self, name: str, step: int, metrics: Dict[str, float], cfg: Dict) -> str:
        formats = {m.name: m for m in (LOSS, *self.test_metrics)}
        return f"{name}, iterations: {step}, " + ", ".join(
            f"test_{k}: {formats.get(k, Metric(k)).format(v)}" for k, v in metrics.items())


def make_rnn(cfg: Dict, input_size: int, **kwargs) -> nn.Module:
    """The torch.nn recurrent stack named by ``--cell/--hidden/--layers`` (time-major unless
    ``batch_first=True`` is passed; other torch.nn arguments pass through)."""
    rnn = RNN_CLASSES[cfg["cell"]](input_size, cfg["hidden"], num_layers=cfg["layers"], **kwargs)
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
    """The seed reports' optimizers; sgd takes ``--momentum`` (classical, default 0),
    momentum is Nesterov 0.9 and RMSProp is TF's (decay 0.9,
    momentum 0.9), as in the copy report. ``--betas`` sets Adam's. ``--weight-decay`` is
    torch's L2 term: decoupled (AdamW) for Adam unless ``--l2-coupling coupled`` (Adam's own
    ``weight_decay``, an L2 term added to the gradient)."""
    name, lr, wd = cfg["optimizer"], cfg["lr"], cfg.get("weight_decay", 0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.get("momentum") or 0.0,
                               weight_decay=wd)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "adam":
        betas = tuple(cfg.get("betas") or (0.9, 0.999))
        adam = torch.optim.Adam if cfg.get("l2_coupling") == "coupled" else torch.optim.AdamW
        return adam(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=0.9, eps=1e-6,
                                   weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def recurrent_backends(model: nn.Module) -> List[str]:
    """Which backend each fusedrnn layer resolves to here (reporting only), else ["torch.nn"]."""
    import fusedrnn
    names = [fusedrnn.resolved_backend(m) for m in model.modules()
             if isinstance(m, (fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN))]
    return sorted(set(names)) or ["torch.nn"]


def metric_formats(task: Task) -> Dict[str, Metric]:
    """Every metric the task declares, by name (loss included)."""
    return {m.name: m for m in (LOSS, *task.train_metrics, *task.test_metrics)}


def headline(metrics: Sequence[Metric]) -> Optional[Metric]:
    return next((m for m in metrics if m.name != "loss"), None)
