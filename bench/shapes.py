"""What every benchmark shares: the seed experiments' layer shapes (name -> (T, B, I, H,
layers)), the layer kinds, and the one call the stand-alone bench scripts time, profile or
count."""
import torch
import torch.nn as nn

from fusedrnn.cells import Cell, cell_for_mode

SEED_SHAPES = {
    "copy": (20, 128, 100, 500, 1),
    "adder11": (11, 128, 64, 64, 2),
    "adder200": (200, 128, 64, 64, 3),
    "smnist": (28, 128, 28, 128, 1),
    "ptb": (25, 20, 200, 200, 2),
    "char": (25, 1, 80, 100, 1),
}


def run_layer(model, x, mode):
    """One benchmark call: "fwd" is inference (no_grad), "fwdbwd" a forward and a backward."""
    if mode == "fwd":
        with torch.no_grad():
            model(x)
    else:
        model(x)[0].sum().backward()


# kind -> (torch.nn layer, torch.nn cell, the mode its fusedrnn cell is registered under)
KINDS = {"LSTM": (nn.LSTM, nn.LSTMCell, "LSTM"), "GRU": (nn.GRU, nn.GRUCell, "GRU"),
         "RNN": (nn.RNN, nn.RNNCell, "RNN_TANH")}


def cell_of(kind: str) -> Cell:
    """The registry's cell for a layer kind (its gate count sizes the GEMMs)."""
    return cell_for_mode(KINDS[kind][2])
