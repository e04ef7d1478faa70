"""The training loop: one ``TrainState`` object that the loop advances and the checkpoint holds,
so ``--resume`` cannot drift from the loop; evaluation, logging and data-parallel training.

Data parallel: under ``torchrun --nproc-per-node N -m tasks.<name> ...`` the model is wrapped
in DistributedDataParallel (gloo on the CPU, nccl on CUDA). A dataset task's global batch of
``--batch-size`` examples is cut into N equal shards, one per process, so a step's gradient is
the single-process gradient of the combined batch; a generated task draws ``batch-size / N``
examples per process from a generator of its own. Only rank 0 evaluates, logs and writes.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import fusedrnn

from .config import resolve_config
from .report import RunLog, plot_curves, print_summary, write_results
from .task import Task, headline, make_optimizer, metric_formats, recurrent_backends


@dataclass
class TrainState:
    """Everything the loop needs to go on from ``step`` exactly as if it had not stopped.

    The checkpoint is these fields plus the model's, the optimizer's and the schedules'
    states, written at every evaluation (``checkpoint.pt``)."""
    step: int = 0
    window: Dict[str, float] = field(default_factory=dict)  # train metric sums since the log
    window_n: int = 0
    plateau_loss: float = 0.0  # train loss sum since the last evaluation (plateau schedule)
    plateau_n: int = 0
    first_loss: Optional[float] = None
    last_eval: Dict[str, Dict[str, float]] = field(default_factory=dict)
    eval_time: float = 0.0
    elapsed: float = 0.0
    records: List[Dict] = field(default_factory=list)
    generator_states: List[torch.Tensor] = field(default_factory=list)  # one per process
    torch_rng: Optional[torch.Tensor] = None
    epoch_order: Optional[torch.Tensor] = None  # a dataset's example order this epoch
    carry: Any = None  # the recurrent state carried to the next batch (truncated BPTT)
    smoothed: Dict[str, float] = field(default_factory=dict)  # smoothed train metrics
    best: Dict[str, float] = field(default_factory=dict)  # value and step of best.pt
    evals_since_best: int = 0


class _World:
    """This process's place in a data-parallel run (rank 0 of 1 without torchrun)."""

    def __init__(self, device: torch.device):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = self.size > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def close(self) -> None:
        """Wait for every process, then destroy the group this run made: a process that exits
        with a live gloo group can abort in its worker threads' teardown (pytorch#190489)."""
        if self.owns_group:
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value):
        """rank 0's ``value`` on every process (what only rank 0's evaluation knows)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> List:
        if self.size == 1:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out


def _default_out(task: Task, cfg: Dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "fused" if cfg["fused"] else "torch"
    return Path("runs") / task.name / f"{cfg['preset']}-{kind}-{stamp}"


def _detached(state):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(_detached(s) for s in state)


class _Run:
    """One training run: its model, optimizer, data, state and outputs."""

    def __init__(self, task: Task, cfg: Dict):
        self.task = task
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        self.device = torch.device(cfg["device"])
        self.dtype = getattr(torch, cfg.get("dtype", "float32"))
        self.world = _World(self.device)
        self.out = Path(cfg["out"] or _default_out(task, cfg))
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
        task.prepare(cfg)
        self.steps_per_epoch = None
        if task.dataset:
            self.steps_per_epoch = task.train_size(cfg) // cfg["batch_size"]
            if self.steps_per_epoch < 1:
                raise ValueError(f"--batch-size {cfg['batch_size']} exceeds the "
                                 f"{task.train_size(cfg)} training examples")
            if cfg.get("epochs"):
                cfg = {**cfg, "iters": cfg["epochs"] * self.steps_per_epoch}
            if cfg["eval_every"] == 0:
                cfg = {**cfg, "eval_every": self.steps_per_epoch}
        elif cfg["eval_every"] == 0:
            cfg = {**cfg, "eval_every": task.epoch_iters}
        if cfg["batch_size"] % self.world.size:
            raise ValueError(f"--batch-size {cfg['batch_size']} does not split over "
                             f"{self.world.size} processes")
        self.cfg = cfg = {**cfg, "out": str(self.out)}

        torch.manual_seed(cfg["seed"])
        model = task.build(cfg)
        if cfg["fused"]:
            model = fusedrnn.convert(model, backend=cfg["backend"])
        self.model = model.to(self.device, self.dtype)
        self.backends = recurrent_backends(self.model)
        self.trained = self.model
        if self.world.size > 1:
            self.trained = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.epoch_steps = self.steps_per_epoch or task.epoch_iters
        self.plateau = self.cosine = self.decay = None
        if cfg["lr_schedule"] == "plateau":
            if cfg["plateau_on"] == "best" and task.best_by is None:
                raise ValueError(f"--plateau-on best: tasks.{task.name} names no test metric")
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=cfg["factor"], patience=cfg["patience"],
                min_lr=cfg["min_lr"], mode="max" if cfg["plateau_on"] == "best" and
                metric_formats(task)[task.best_by[1]].higher_is_better else "min")
        elif cfg["lr_schedule"] == "cosine":
            self.cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=cfg["iters"], eta_min=cfg["min_lr"])
        elif cfg["lr_schedule"] == "decay":  # Zaremba et al.: fixed, then a factor per epoch
            start, factor = cfg["decay_start"], cfg["factor"]
            self.decay = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda epoch: factor ** max(0, epoch + 1 - start))
        self.schedulers = [s for s in (self.plateau, self.cosine, self.decay) if s is not None]
        # the data order: one generator, shared by every process for a dataset (each takes its
        # shard of the same global batch), one per process for generated data
        seed = cfg["seed"] + 1 + (0 if task.dataset else 1000 * self.world.rank)
        self.generator = torch.Generator().manual_seed(seed)
        self.tests = {name: self._cast(data) for name, data in task.test_sets(
            cfg, torch.Generator().manual_seed(cfg["seed"] + 2), self.device).items()} \
            if self.world.main else {}
        self.state = TrainState()
        self.checkpoint = self.out / "checkpoint.pt"
        if cfg["resume"]:
            self._load_checkpoint()
        self.log = RunLog(self.out / "metrics.jsonl" if self.world.main else None,
                          self.state.records)
        self.state.records = self.log.records
        self.formats = metric_formats(task)
        self.smoothing = {m.name: m.smoothing for m in task.train_metrics if m.smoothing}
        self.n_params = sum(p.numel() for p in self.model.parameters())
        procs = f" processes={self.world.size}" if self.world.size > 1 else ""
        self.header = (f"tasks.{task.name} preset={cfg['preset']} "
                       f"{'fused' if cfg['fused'] else 'torch.nn'} backend={','.join(self.backends)} "
                       f"cell={cfg['cell']} layers={cfg['layers']} hidden={cfg['hidden']} "
                       f"params={self.n_params} threads={torch.get_num_threads()}{procs} "
                       f"seed={cfg['seed']} -> {self.out}")

    # -- checkpoints ------------------------------------------------------------------------
    def _load_checkpoint(self) -> None:
        if not self.checkpoint.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint}")
        saved = torch.load(self.checkpoint, weights_only=False)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        for sched, state in zip(self.schedulers, saved["schedulers"]):
            sched.load_state_dict(state)
        self.state = TrainState(**saved["state"])
        states = self.state.generator_states
        if len(states) != (1 if self.task.dataset else self.world.size):
            raise ValueError(f"--resume: the checkpoint was written by {len(states)} "
                             f"process(es), this run has {self.world.size}")
        self.generator.set_state(states[0 if self.task.dataset else self.world.rank])
        torch.set_rng_state(self.state.torch_rng)

    def _save_checkpoint(self, start: float) -> None:
        """Called by every process (the generator states are gathered), written by rank 0."""
        states = self.world.gather(self.generator.get_state())
        if not self.world.main:
            return
        self.state.generator_states = states[:1] if self.task.dataset else states
        self.state.torch_rng = torch.get_rng_state()
        self.state.elapsed = time.perf_counter() - start
        saved = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     schedulers=[s.state_dict() for s in self.schedulers],
                     state=asdict(self.state))
        torch.save(saved, self.out / "checkpoint.pt.tmp")
        os.replace(self.out / "checkpoint.pt.tmp", self.checkpoint)

    # -- data -------------------------------------------------------------------------------
    def _cast(self, data):
        """A batch (or test data) with its floating-point tensors in the run's dtype."""
        if isinstance(data, torch.Tensor):
            return data.to(self.dtype) if data.is_floating_point() else data
        if isinstance(data, dict):
            return {k: self._cast(v) for k, v in data.items()}
        if isinstance(data, (tuple, list)):
            return type(data)(self._cast(v) for v in data)
        return data

    def _epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def _next_batch(self, step: int) -> Dict:
        """The batch of ``step`` (1-based) for this process."""
        cfg = self.cfg
        if not self.task.dataset:
            return self._cast(self.task.sample(
                {**cfg, "batch_size": cfg["batch_size"] // self.world.size}, self.generator,
                self.device))
        position = (step - 1) % self.steps_per_epoch
        if position == 0 or self.state.epoch_order is None:
            self.state.epoch_order = self.task.epoch_order(cfg, self.generator)
            self.state.carry = None  # a new pass over the data starts from a zero state
        size = cfg["batch_size"] // self.world.size
        begin = position * cfg["batch_size"] + self.world.rank * size
        return self._cast(self.task.train_batch(cfg, self.state.epoch_order[begin:begin + size],
                                                self.device))

    # -- evaluation -------------------------------------------------------------------------
    def _evaluate(self, step: int) -> None:
        if not self.world.main:
            return
        t0 = time.perf_counter()
        self.model.eval()
        extra = {"epoch": round(self._epoch(step), 4)} if self.task.dataset else {}
        last_train = next((r for r in reversed(self.log.records) if r["kind"] == "train"), None)
        line = last_train and self.task.train_log_line(step, last_train, self.cfg)
        if line:
            tqdm.write(line, file=sys.stdout)
        with torch.no_grad():
            for name, data in self.tests.items():
                metrics = self.task.evaluate(self.model, self.cfg, data)
                self.state.last_eval[name] = metrics
                self.log.write(kind="test", step=step, name=name, **extra, **metrics)
                tqdm.write(self.task.log_line(name, step, metrics, self.cfg), file=sys.stdout)
            self.task.after_evaluation(self.model, self.cfg, step)
        self._keep_best(step)
        self.model.train()
        self.state.eval_time += time.perf_counter() - t0
        sys.stdout.flush()

    def _after_evaluation(self) -> bool:
        """The plateau schedule's step (on the train loss since the last evaluation, or on
        the ``best_by`` test metric); True when ``--stop-after`` says to stop."""
        s, cfg = self.state, self.cfg
        watched = None
        if self.task.best_by is not None and self.world.main:
            name, key = self.task.best_by
            watched = s.last_eval[name][key]
        watched, since = self.world.broadcast((watched, s.evals_since_best))
        if self.plateau is not None:
            self.plateau.step(watched if cfg["plateau_on"] == "best"
                              else s.plateau_loss / max(s.plateau_n, 1))
        s.plateau_loss, s.plateau_n = 0.0, 0
        return bool(cfg["stop_after"]) and since >= cfg["stop_after"]

    def _keep_best(self, step: int) -> None:
        """best.pt: the weights of the best evaluation so far by the task's ``best_by``."""
        if self.task.best_by is None:
            return
        name, key = self.task.best_by
        value = self.state.last_eval[name][key]
        sign = 1 if self.formats[key].higher_is_better else -1
        best = self.state.best
        self.state.evals_since_best += 1
        if not best or sign * value > sign * best["value"]:
            self.state.best = dict(value=value, step=step)
            self.state.evals_since_best = 0
            torch.save(self.model.state_dict(), self.out / "best.pt.tmp")
            os.replace(self.out / "best.pt.tmp", self.out / "best.pt")

    def _finish(self) -> Dict:
        """The task's end hook, with the best weights loaded and every test set evaluated
        with them (``best_by``), else with the last weights."""
        extra = {}
        self.model.eval()
        with torch.no_grad():
            if self.state.best:
                self.model.load_state_dict(torch.load(self.out / "best.pt"))
                name, key = self.task.best_by
                tests = {n: self.task.evaluate(self.model, self.cfg, d)
                         for n, d in self.tests.items()}
                extra["best"] = dict(by=f"{name} {key}", step=self.state.best["step"],
                                     value=self.state.best["value"], test=tests)
                print(f"\nthe best weights by {name} {key} (step {self.state.best['step']}):")
                for n, m in tests.items():
                    print(self.task.log_line(n, self.state.best["step"], m, self.cfg))
            extra.update(self.task.finish(self.model, self.cfg, extra))
        return extra

    def _plot(self) -> Optional[Path]:
        if not (self.cfg["plot"] and self.world.main):
            return None
        return plot_curves(self.task, {"": self.log.records}, self.out / "curves.png",
                           title=self.header.split(" ->")[0])

    # -- the loop ---------------------------------------------------------------------------
    def _train_step(self, step: int) -> float:
        """One optimizer step; returns the loss (its metrics are added to the window only
        when it is finite)."""
        batch = self._next_batch(step)
        if self.task.carries_state:
            loss, stats, carry = self.task.loss(self.trained, batch, self.state.carry)
            self.state.carry = _detached(carry)
        else:
            loss, stats = self.task.loss(self.trained, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg["clip"]:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip"])
        if self.cfg["clip_value"]:
            nn.utils.clip_grad_value_(self.model.parameters(), self.cfg["clip_value"])
        self.optimizer.step()
        if self.cosine is not None:
            self.cosine.step()
        value = loss.item()
        if not math.isfinite(value):
            return value
        s = self.state
        if s.first_loss is None:
            s.first_loss = value
            self.log.write(kind="first", step=1, loss=value)
        for key, v in {"loss": value, **stats}.items():
            s.window[key] = s.window.get(key, 0.0) + v
            if key in self.smoothing:
                decay = self.smoothing[key]
                s.smoothed[key] = decay * s.smoothed.get(key, v) + (1 - decay) * v
        s.window_n += 1
        s.plateau_loss += value
        s.plateau_n += 1
        return value

    def _log_train(self, step: int, start: float, bar) -> None:
        s = self.state
        means = {k: s.smoothed.get(k, v / s.window_n) for k, v in s.window.items()}
        for m in self.task.train_metrics:
            if m.derive is not None:
                means[m.name] = m.derive(means)
        items = self.task.items_per_step(self.cfg)
        now = time.perf_counter()
        if items is not None and now > self.last_log[0]:
            what, n = items
            means[f"{what}_per_s"] = n * (step - self.last_log[1]) / (now - self.last_log[0])
        self.last_log = (now, step)
        lr = self.optimizer.param_groups[0]["lr"]
        extra = {"epoch": round(self._epoch(step), 4)} if self.task.dataset else {}
        self.log.write(kind="train", step=step, **extra, **means, lr=lr,
                       elapsed=time.perf_counter() - start)
        shown = {k: self.formats[k].format(v) if k in self.formats else f"{v:.4g}"
                 for k, v in means.items()}
        bar.set_postfix(**shown, lr=f"{lr:.2g}")
        s.window, s.window_n = {}, 0

    def _bar_label(self, step: int) -> str:
        if not self.task.dataset:
            return self.task.name
        epochs = math.ceil(self.cfg["iters"] / self.steps_per_epoch)
        return f"{self.task.name} epoch {step // self.steps_per_epoch + 1}/{epochs}"

    def run(self) -> Dict:
        cfg, s = self.cfg, self.state
        if self.world.main:
            print(self.header, flush=True)
            if cfg["resume"]:
                print(f"resumed from {self.checkpoint} at step {s.step}", flush=True)
        per_epoch = self.steps_per_epoch if self.task.dataset else None  # a bar per epoch
        bar = tqdm(total=per_epoch or cfg["iters"],
                   initial=s.step % per_epoch if per_epoch else s.step,
                   desc=self._bar_label(s.step), dynamic_ncols=True,
                   disable=(None if cfg["progress"] is None else not cfg["progress"])
                   if self.world.main else True, file=sys.stderr,
                   unit="step" if not self.task.dataset else "batch")
        start = time.perf_counter() - s.elapsed
        self.last_log = (time.perf_counter(), s.step)
        status = "finished"
        try:
            self.trained.train()
            for step in range(s.step + 1, cfg["iters"] + 1):
                value = self._train_step(step)
                if not math.isfinite(value):
                    status = f"diverged (loss {value}) at step {step}"
                    break
                s.step = step
                bar.update(1)
                if per_epoch and step % per_epoch == 0 and step < cfg["iters"]:
                    bar.reset()
                    bar.set_description(self._bar_label(step))
                evaluates = step % cfg["eval_every"] == 0 or step == cfg["iters"]
                if step % cfg["log_every"] == 0 or evaluates:
                    self._log_train(step, start, bar)
                if self.decay is not None and step % self.epoch_steps == 0:
                    self.decay.step()
                if evaluates:
                    self._evaluate(step)
                    stop = self._after_evaluation()
                    if self.world.main:
                        write_results(self.out, self.task, cfg, self.backends, self.n_params,
                                      self.log, s.last_eval, step, time.perf_counter() - start,
                                      s.eval_time, "running", self.world.size)
                        self._plot()
                    self._save_checkpoint(start)
                    if stop:
                        status = (f"stopped early at step {step}: no better "
                                  f"{' '.join(self.task.best_by)} in {cfg['stop_after']} "
                                  "evaluations")
                        break
        except KeyboardInterrupt:
            status = f"interrupted at step {s.step}"
        finally:
            bar.close()
        if not self.world.main:
            return {}
        wall = time.perf_counter() - start
        extra = self._finish()
        results = write_results(self.out, self.task, cfg, self.backends, self.n_params,
                                self.log, s.last_eval, s.step, wall, s.eval_time, status,
                                self.world.size, extra)
        self.log.close()
        plot = self._plot()
        if plot is not None:
            results["plot"] = str(plot)
        print_summary(self.task, results)
        return results


def train(task: Task, cfg: Dict) -> Dict:
    """Train one model as ``cfg`` says; write log, results and plot under ``cfg['out']``."""
    run = _Run(task, cfg)
    results = run.run()
    run.world.close()  # only after a run that ended well: a failed one must not wait here
    return results


def compare(task: Task, cfg: Dict) -> Dict[str, Dict]:
    """torch.nn then fused from the same seed and batches: both runs' numbers, the speed
    ratio, and one plot with both runs' curves on the same axes (compare.png)."""
    import json

    out = Path(cfg["out"] or _default_out(task, {**cfg, "fused": True}).with_name(
        f"{cfg['preset']}-compare-{time.strftime('%Y%m%d-%H%M%S')}"))
    runs = {}
    for kind, fused in (("torch", False), ("fused", True)):
        runs[kind] = train(task, {**cfg, "fused": fused, "out": str(out / kind)})
    t, f = runs["torch"], runs["fused"]
    main_metric = headline(task.test_metrics)
    print(f"\n{'':<10} {'first loss':>12} {'steps/s':>10} {'wall s':>9}  final test "
          f"{main_metric.name if main_metric else 'loss'}")
    for kind, r in (("torch.nn", t), ("fused", f)):
        finals = ", ".join(f"{n} {main_metric.format(m[main_metric.name])}" if main_metric
                           else f"{n} {m['loss']:.4f}" for n, m in r["test"].items())
        print(f"{kind:<10} {r['first_loss']:>12.6f} {r['steps_per_s']:>10.2f} "
              f"{r['wall_time_s']:>9.1f}  {finals}")
    ratio = f["steps_per_s"] / t["steps_per_s"]
    print(f"fused/torch.nn speed ratio: {ratio:.2f}x (fused backend {','.join(f['backends'])})")
    records = {kind: [json.loads(line) for line in open(r["metrics_log"])]
               for kind, r in (("torch.nn", t), ("fused", f))}
    overlay = plot_curves(task, records, out / "compare.png",
                          title=f"tasks.{task.name} preset={cfg['preset']}: torch.nn and fused")
    print(f"overlay: {overlay}")
    (out / "compare.json").write_text(json.dumps(
        {"speed_ratio_fused_over_torch": ratio, "torch": t["results_file"],
         "fused": f["results_file"], "plot": str(overlay)}, indent=2))
    return runs


def run_grid(task: Task, argv: List[str]) -> Dict[str, Dict]:
    """Every preset of ``task.grid`` in turn, each in ``<out>/<preset>`` (a finished one is
    skipped and a partial one resumed, so the grid goes on where it stopped; the flags given
    apply to every run), then the task's table and figure (``write_grid``)."""
    import json

    base = resolve_config(task, argv)
    out = Path(base["out"] or Path("runs") / task.name /
               f"grid-{'fused' if base['fused'] else 'torch'}")
    results = {}
    for preset in task.grid:
        run_dir = out / preset
        done = run_dir / "results.json"
        if done.exists() and json.loads(done.read_text())["status"] == "finished":
            results[preset] = json.loads(done.read_text())
            continue
        cfg = resolve_config(task, [*argv, "--preset", preset, "--out", str(run_dir)])
        cfg["resume"] = (run_dir / "checkpoint.pt").exists()
        results[preset] = train(task, cfg)
    task.write_grid(out, results)
    return results


def main(task: Task, argv: Optional[List[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = resolve_config(task, argv)
    if cfg["preset"] == "grid" and task.grid:
        return run_grid(task, argv)
    if cfg["compare"]:
        return compare(task, cfg)
    return train(task, cfg)
