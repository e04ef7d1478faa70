"""fusedrnn: torch.nn's LSTM, GRU and RNN on fused kernels.

Where things are (``dispatch._REGISTRY`` is the one list of backends, ``cells.CELLS`` of cells):

- modules.py -> functional.rnn_stack(x, StackArgs) (cells: rnn_layer(x, LayerArgs)) ->
  dispatch.select (once per layer spec) -> a backend's ``stack``/``layer``/``sequence``
  (backend/base.py: the interface, StackArgs and LayerArgs)
- cells.py: the cell registry, each cell's traits and its math in torch (and names its Triton
  math); backend/reference.py: the oracle, a torch time loop over it
- backend/cpu.py -> csrc/cpu/sequence.cpp (loops), csrc/cpu/stack_autograd.cpp (the training
  stack's autograd node), csrc/cells/cells.h (the C++/CUDA cell list and traits; cell math in
  csrc/cells/*.h), csrc/cpu/buffer_cache.h (the loops' buffers)
- backend/triton.py -> kernels/pointwise.py, kernels/persistent.py (generic kernels;
  kernels/cells.py: cell math)
- backend/cuda.py -> csrc/cuda/kernels.h (CUDA C++ kernels over csrc/cells; built and called by
  backend/cuda_library.py; csrc/cuda/emulate runs them on CPU threads for tests)
- backend/loops.py: the per-step and persistent loops and the autograd Function that the
  Triton and CUDA backends share
- backend/transforms.py: derivatives the fused backwards do not give (higher order, torch.func)
"""
from .backend.cpu import cpu_info
from .dispatch import BackendUnavailableError, backends
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert, resolved_backend

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "backends",
           "resolved_backend", "BackendUnavailableError", "cpu_info"]
__version__ = "0.1.0"
