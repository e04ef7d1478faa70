"""The seed experiments' layer shapes that every benchmark uses: name -> (T, B, I, H, layers),
and the one call the stand-alone bench scripts time, profile or count."""
import torch

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
