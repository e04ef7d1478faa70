"""The shared task harness (a task subclasses ``Task`` and calls ``main(task)``):

- task.py: what a task supplies (``Task``, the metrics it declares) and the shared model
  pieces (``make_rnn``, ``make_optimizer``, ``chrono_init_``);
- config.py: flags and presets (common defaults < task defaults < preset < flags);
- loop.py: the training loop over one checkpointed ``TrainState``; evaluation;
  data-parallel training under torchrun; ``--compare``; ``--preset grid``;
- report.py: the JSON-lines log, results.json, the curves and the summary table.
"""
from .config import COMMON_DEFAULTS, build_parser, resolve_config
from .loop import TrainState, compare, main, run_grid, train
from .report import RunLog, plot_curves, print_summary, save_grid, write_results
from .task import (LOSS, OPTIMIZERS, RNN_CLASSES, Metric, Task, chrono_init_, make_optimizer,
                   make_rnn, recurrent_backends)

__all__ = ["COMMON_DEFAULTS", "LOSS", "OPTIMIZERS", "RNN_CLASSES", "Metric", "RunLog", "Task",
           "TrainState", "build_parser", "chrono_init_", "compare", "main", "make_optimizer",
           "make_rnn", "plot_curves", "print_summary", "recurrent_backends", "resolve_config",
           "run_grid", "save_grid", "train", "write_results"]
