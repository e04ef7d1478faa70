"""Each cell's pointwise math in Triton, defined once (forward and backward) and plugged into
the generic per-step kernels (``pointwise``) and whole-sequence kernels (``persistent``) as
constexpr function arguments (``Cell.triton_math`` in fusedrnn/cells.py names them), so the
kernels never branch on which cell they run.

Mirrors ``fusedrnn/cells.py``. Every cell has the same two signatures:

- ``fwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c) -> (h_new, c_new)``
- ``bwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh, dc) -> (d0, d1, d2, d3, e0, e1, e2, e3,
  dh_direct, dc_prev)``

Gates arrive as up to four ``[rows, H]`` tiles of ``xg = x W_ih^T + b_ih`` (``x0..x3``) and
``hg = h W_hh^T + b_hh`` (``g0..g3``); a cell ignores the ones past its gate count. ``d``
are the gradients of the xg pre-activations, ``e`` of the hg ones (equal unless the cell
splits them), ``dh_direct`` the gradient reaching h_prev other than through hg (0 unless the
cell reads h), ``dc_prev`` the cell state's (``dc`` passed through for cells without one).
``c`` passes through unchanged in the forward of cells without a cell state. All math is
fp32. tanh is written as ``2 sigmoid(2x) - 1`` because Triton has no ``tl.tanh`` and libdevice
does not run in the interpreter.
"""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def relu(x):
    """NaN passes through, as in torch.relu (tl.maximum would drop it)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def lstm_fwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c):
    i = sigmoid(x0 + g0)
    f = sigmoid(x1 + g1)
    g = tanh(x2 + g2)
    o = sigmoid(x3 + g3)
    c_new = f * c + i * g
    return o * tanh(c_new), c_new


@triton.jit
def lstm_bwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh, dc):
    i = sigmoid(x0 + g0)
    f = sigmoid(x1 + g1)
    g = tanh(x2 + g2)
    o = sigmoid(x3 + g3)
    tc = tanh(f * c + i * g)
    dc_total = dc + dh * o * (1.0 - tc * tc)
    d_i = dc_total * g * i * (1.0 - i)
    d_f = dc_total * c * f * (1.0 - f)
    d_g = dc_total * i * (1.0 - g * g)
    d_o = dh * tc * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, d_i, d_f, d_g, d_o, tl.zeros_like(dh), dc_total * f


@triton.jit
def gru_fwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c):
    r = sigmoid(x0 + g0)
    z = sigmoid(x1 + g1)
    n = tanh(x2 + r * g2)
    return n + z * (h - n), c


@triton.jit
def gru_bwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh, dc):
    r = sigmoid(x0 + g0)
    z = sigmoid(x1 + g1)
    n = tanh(x2 + r * g2)
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    d_z = dh * (h - n) * z * (1.0 - z)
    d_r = d_n * g2 * r * (1.0 - r)
    zero = tl.zeros_like(dh)
    return d_r, d_z, d_n, zero, d_r, d_z, d_n * r, zero, dh * z, dc


@triton.jit
def rnn_tanh_fwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c):
    return tanh(x0 + g0), c


@triton.jit
def rnn_tanh_bwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh, dc):
    t = tanh(x0 + g0)
    d = dh * (1.0 - t * t)
    zero = tl.zeros_like(dh)
    return d, zero, zero, zero, d, zero, zero, zero, zero, dc


@triton.jit
def rnn_relu_fwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c):
    return relu(x0 + g0), c


@triton.jit
def rnn_relu_bwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh, dc):
    d = tl.where(relu(x0 + g0) <= 0.0, 0.0, dh)  # torch's threshold_backward: NaN passes dh on
    zero = tl.zeros_like(dh)
    return d, zero, zero, zero, d, zero, zero, zero, zero, dc
