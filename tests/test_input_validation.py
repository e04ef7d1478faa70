"""Malformed input raises what torch.nn raises, on every backend, and never reaches a kernel.

PackedSequence is a plain named tuple: nothing stops a caller from building one whose counts
do not fit its rows. The modules check the counts once (``modules._step_counts``), so no
backend, the Triton kernels included, ever indexes past a buffer.
"""

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from conftest import assert_close, runs_on_cpu_tensors




BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(not runs_on_cpu_tensors(n),
                                                     reason=f"{n} unavailable"))
            for n in ("reference", "cpu", "triton:persistent", "triton:alternating",
                      "cuda:persistent", "cuda:pointwise")]
MODES = ["LSTM", "GRU", "RNN"]

X = torch.randn(7, 3)
COUNTS = torch.tensor([3, 2, 2])
TAMPERED = {  # name: (batch_sizes, sorted_indices, unsorted_indices)
    "increasing": (torch.tensor([1, 3, 3]), None, None),
    "sum_more_than_rows": (torch.tensor([3, 3, 3]), None, None),
    "negative": (torch.tensor([3, 5, -1]), None, None),
    "int32": (COUNTS.int(), None, None),
    "float": (COUNTS.float(), None, None),
    "two_dimensional": (COUNTS.unsqueeze(0), None, None),
    "empty": (COUNTS[:0], None, None),
    "zero_dimensional": (torch.tensor(3), None, None),
    "sorted_indices_out_of_range": (COUNTS, torch.tensor([1, 0, 5]), torch.tensor([1, 0, 2])),
}


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (the class is what is compared)
        return type(exc)
    return None


@pytest.mark.parametrize("given_state", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("case", list(TAMPERED))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tampered_packed_input_raises_like_torch_nn(backend, mode, case, given_state):
    batch_sizes, sorted_indices, unsorted_indices = TAMPERED[case]
    packed = PackedSequence(X, batch_sizes, sorted_indices, unsorted_indices)
    ref = getattr(nn, mode)(3, 4)
    fused = getattr(fusedrnn, mode)(3, 4, backend=backend)
    fused.load_state_dict(ref.state_dict())
    hx = torch.randn(1, 3, 4)
    hx = ((hx, hx.clone()) if mode == "LSTM" else hx) if given_state else None
    expected = _raised(lambda: ref(packed, hx))
    if expected is None and case == "increasing":
        # torch.nn accepts increasing counts with an LSTM state and reads past the rows (9
        # output rows from 7): fusedrnn raises instead
        expected = RuntimeError
    if expected is None:  # harmless where torch.nn does not read it (no state to permute)
        assert_close(fused(packed, hx)[0].data, ref(packed, hx)[0].data, torch.float32)
        return
    with pytest.raises(expected):
        fused(packed, hx)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_summing_short_of_the_rows_use_the_leading_rows(backend, mode):
    """torch.nn ignores packed rows past sum(batch_sizes); so does fusedrnn, to the gradient."""
    dtype = torch.float32
    ref = getattr(nn, mode)(3, 4)
    fused = getattr(fusedrnn, mode)(3, 4, backend=backend)
    fused.load_state_dict(ref.state_dict())
    results = []
    for module in (ref, fused):
        x = X.clone().requires_grad_()
        out, _ = module(PackedSequence(x, torch.tensor([3, 2, 1]), None, None))
        results.append([out.data, *torch.autograd.grad(out.data.sum(), [x])])
    assert results[0][0].shape == (6, 4)
    for a, b in zip(results[1], results[0]):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_packed_data_is_accepted(backend, mode):
    ref = getattr(nn, mode)(3, 4)
    fused = getattr(fusedrnn, mode)(3, 4, backend=backend)
    fused.load_state_dict(ref.state_dict())
    data = torch.randn(3, 7).t()  # [7, 3], not contiguous
    packed = PackedSequence(data, COUNTS, None, None)
    assert not packed.data.is_contiguous()
    assert_close(fused(packed)[0].data, ref(packed)[0].data, torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_short_sorted_indices_with_a_state_are_refused(backend, mode):
    """A too-short permutation would hand the kernels a state with fewer rows than the batch."""
    x = torch.randn(4, 3, 3)
    packed = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
    packed = PackedSequence(packed.data, packed.batch_sizes, packed.sorted_indices[:2],
                            packed.unsorted_indices[:2])
    fused = getattr(fusedrnn, mode)(3, 4, backend=backend)
    hx = torch.randn(1, 3, 4)
    with pytest.raises(RuntimeError, match="Expected hidden"):
        fused(packed, (hx, hx) if mode == "LSTM" else hx)


@pytest.mark.parametrize("mode", MODES)
def test_packed_input_with_a_wrong_feature_size_is_refused(mode):
    """torch.nn does not check this for a packed LSTM (its C++ reads past the rows for some
    sizes); fusedrnn raises."""
    packed = PackedSequence(torch.randn(7, 5), COUNTS, None, None)
    with pytest.raises(RuntimeError, match="input_size"):
        getattr(fusedrnn, mode)(3, 4)(packed)


@pytest.mark.parametrize("cls", [fusedrnn.LSTMCell, fusedrnn.GRUCell, fusedrnn.RNNCell])
def test_unbatched_cell_input_with_a_batched_state_is_refused(cls):
    """torch.nn's LSTMCell and GRUCell crash the process here; fusedrnn raises."""
    cell = cls(3, 4)
    h = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="unbatched"):
        cell(torch.randn(3), (h, h) if cls is fusedrnn.LSTMCell else h)


# --- torch.nn's error classes and wording ---

def test_device_mismatch_uses_torch_nn_wording():
    for module in (nn.LSTM(3, 4).to("meta"), fusedrnn.LSTM(3, 4).to("meta")):
        with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same "
                                               "device, found input tensor at cpu and parameter "
                                               "tensor at meta"):
            module(torch.randn(2, 1, 3))
    h = torch.randn(1, 1, 4, device="meta")
    for module in (nn.GRU(3, 4), fusedrnn.GRU(3, 4)):
        with pytest.raises(RuntimeError, match="Input and hidden tensors are not at the same "
                                               "device, found input tensor at cpu and hidden "
                                               "tensor at meta"):
            module(torch.randn(2, 1, 3), h)
    for module in (nn.GRUCell(3, 4).to("meta"), fusedrnn.GRUCell(3, 4).to("meta")):
        with pytest.raises(RuntimeError, match="Tensor on device meta is not on the expected "
                                               "device cpu!"):
            module(torch.randn(2, 3))


@pytest.mark.parametrize("case", ["list_input", "list_state", "two_dimensional_counts",
                                  "batched_cell_input_unbatched_state", "lstm_one_state"])
def test_error_classes_match_torch_nn(case):
    x = torch.randn(2, 1, 3)
    pairs = {
        "list_input": lambda m: m([x]),
        "list_state": lambda m: m(x, [torch.randn(1, 1, 4)]),
        "two_dimensional_counts": lambda m: m(PackedSequence(X, COUNTS.unsqueeze(0), None, None)),
        "batched_cell_input_unbatched_state": lambda m: m(torch.randn(2, 3), torch.randn(4)),
        "lstm_one_state": lambda m: m(x, (torch.randn(1, 1, 4),)),
    }
    cls = {"batched_cell_input_unbatched_state": "GRUCell", "lstm_one_state": "LSTM"}.get(case, "GRU")
    expected = _raised(lambda: pairs[case](getattr(nn, cls)(3, 4)))
    assert expected is not None
    with pytest.raises(expected):
        pairs[case](getattr(fusedrnn, cls)(3, 4))
