"""fusedrnn: torch.nn's LSTM, GRU and RNN on fused kernels.

Find a kernel in two hops: the modules (``modules.py``) call ``functional.rnn_layer``,
which asks ``dispatch.select`` for a backend; ``dispatch._REGISTRY`` names each backend's
module under ``fusedrnn/backend/``, and that module names its kernels.
"""
from .dispatch import BackendUnavailableError, backends
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "backends",
           "BackendUnavailableError"]
__version__ = "0.1.0"
