"""CPU autocast: fusedrnn's layers compute in the dtype torch.nn's do (a per-layer policy:
modules._cpu_autocast_dtype), on every backend, with gradients reaching the float32 weights."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence

import fusedrnn

LAYERS = [("LSTM", {}), ("LSTM", {"proj_size": 4}), ("GRU", {}), ("RNN", {}),
          ("RNN", {"nonlinearity": "relu"}), ("LSTM", {"num_layers": 2, "bidirectional": True})]


def _call(model, inp, dtype):
    """Output and first state under CPU autocast, or the exception raised."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            out, hidden = model(inp)
    except Exception as exc:  # noqa: BLE001 (the class is what is compared)
        return exc, None
    return None, (out.data if hasattr(out, "batch_sizes") else out,
                  hidden[0] if isinstance(hidden, tuple) else hidden)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda x: x[0] + "".join(f"-{k}" for k in x[1]))
def test_layers_compute_in_torch_nn_dtype(autocast_dtype, packed, layer):
    mode, kwargs = layer
    ref = getattr(nn, mode)(6, 10, **kwargs)
    fused = getattr(fusedrnn, mode)(6, 10, **kwargs)
    fused.load_state_dict(ref.state_dict())
    inp = (pack_sequence([torch.randn(5, 6), torch.randn(3, 6)]) if packed
           else torch.randn(5, 3, 6))
    (ref_exc, ref_out), (exc, out) = _call(ref, inp, autocast_dtype), _call(fused, inp,
                                                                           autocast_dtype)
    assert type(exc) is type(ref_exc), f"torch.nn raised {ref_exc!r}, fusedrnn {exc!r}"
    if ref_out is not None:
        assert [t.dtype for t in out] == [t.dtype for t in ref_out]


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_compute_in_torch_nn_dtype(autocast_dtype, name):
    ref = getattr(nn, name)(6, 10)
    fused = getattr(fusedrnn, name)(6, 10)
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=autocast_dtype):
        dtypes = [(lambda h: (h[0] if isinstance(h, tuple) else h).dtype)(m(x))
                  for m in (ref, fused)]
    assert dtypes[0] == dtypes[1]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode,kwargs", [("LSTM", {}), ("LSTM", {"proj_size": 4}),
                                         ("RNN", {}), ("GRU", {})])
def test_bf16_autocast_values_and_float32_gradients(rng, backend, mode, kwargs):
    """Under bf16 autocast the outputs are close to float64 torch.nn normwise, and the gradients
    of the float32 input and weights are float32, as torch.nn's. Bounds: 3e-2 for `cpu` (float32
    states); 7e-2 for `reference`, which keeps its states in bf16 as torch.nn's bf16 layers do
    (they measure up to 3.3e-2 against float64 here). The projected LSTM's small outputs come
    from cancelling sums: over 25 draws its worst error reached 1.5e-2 (cpu) and 3.5e-2
    (reference), half these bounds; the others stay under a fifth of them."""
    bound = 3e-2 if backend == "cpu" else 7e-2
    ref = getattr(nn, mode)(6, 24, num_layers=2, dtype=torch.float64, **kwargs)
    fused = getattr(fusedrnn, mode)(6, 24, num_layers=2, backend=backend, **kwargs)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(7, 5, 6, dtype=torch.float64) * 0.5
    results = []
    for model, inp, autocast in ((ref, x, False), (fused, x.float(), True)):
        inp = inp.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, hidden = model(inp)
        h = hidden[0] if isinstance(hidden, tuple) else hidden
        weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        ((out.double() * weight).sum() + (h.double() ** 2).sum()).backward()
        results.append([out, h, inp.grad, *[p.grad for p in model.parameters()]])
    for t in results[1][2:]:
        assert t.dtype == torch.float32
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        err, scale = (a.double() - b).abs().max().item(), b.abs().max().item()
        assert err <= bound * scale + 1e-6, f"tensor {i}: {err:.3g} > {bound} x {scale:.3g}"
