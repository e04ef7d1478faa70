"""fusedrnn: torch.nn's LSTM, GRU and RNN on fused kernels.

Where things are (``dispatch._REGISTRY`` is the one list of backends):

- modules.py -> functional.rnn_layer -> dispatch.select -> a backend's ``layer``/``sequence``
- backend/reference.py: the oracle, a torch time loop over cells.py (the cell registry)
- backend/cpu.py -> csrc/cpu/sequence.cpp (loops), csrc/cells/*.h (cell math, C++/CUDA),
  csrc/cpu/buffer_cache.h (where the loops' large buffers come from)
- backend/triton.py -> kernels/pointwise.py, kernels/persistent.py (kernels/cells.py: cell math)
- backend/transforms.py: derivatives the fused backwards do not give (higher order, torch.func)
"""
from .dispatch import BackendUnavailableError, backends
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "backends",
           "BackendUnavailableError"]
__version__ = "0.1.0"
