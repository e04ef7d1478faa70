"""Each cell's pointwise math in Triton, defined once (forward and backward) and shared by
the per-step kernels (``pointwise``) and the whole-sequence kernels (``persistent``).

Mirrors ``fusedrnn/cells.py``: gates arrive as up to four ``[rows, H]`` tiles of
``xg = x W_ih^T + b_ih`` (``x0..x3``) and ``hg = h W_hh^T + b_hh`` (``g0..g3``); unused
gates of cells with fewer than four are ignored. All math is fp32.
tanh is written as ``2 sigmoid(2x) - 1`` because Triton has no ``tl.tanh`` and libdevice
does not run in the interpreter.
"""
import triton
import triton.language as tl

# cell ids, passed to the kernels as the CELL constexpr (see CELL_IDS)
LSTM: tl.constexpr = tl.constexpr(0)
GRU: tl.constexpr = tl.constexpr(1)
RNN_TANH: tl.constexpr = tl.constexpr(2)
RNN_RELU: tl.constexpr = tl.constexpr(3)
CELL_IDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


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
def lstm_fwd(x0, x1, x2, x3, g0, g1, g2, g3, c):
    i = sigmoid(x0 + g0)
    f = sigmoid(x1 + g1)
    g = tanh(x2 + g2)
    o = sigmoid(x3 + g3)
    c_new = f * c + i * g
    return o * tanh(c_new), c_new


@triton.jit
def lstm_bwd(x0, x1, x2, x3, g0, g1, g2, g3, c, dh, dc):
    """Returns the pre-activation gradients (same for xg and hg) and dc_prev."""
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
    return d_i, d_f, d_g, d_o, dc_total * f


@triton.jit
def gru_fwd(x0, x1, x2, g0, g1, g2, h):
    r = sigmoid(x0 + g0)
    z = sigmoid(x1 + g1)
    n = tanh(x2 + r * g2)
    return n + z * (h - n)


@triton.jit
def gru_bwd(x0, x1, x2, g0, g1, g2, h, dh):
    """Returns d(xr, xz, xn), d(hr, hz, hn) pre-activations and the direct dh_prev term."""
    r = sigmoid(x0 + g0)
    z = sigmoid(x1 + g1)
    n = tanh(x2 + r * g2)
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    d_z = dh * (h - n) * z * (1.0 - z)
    d_r = d_n * g2 * r * (1.0 - r)
    return d_r, d_z, d_n, d_r, d_z, d_n * r, dh * z


@triton.jit
def cell_fwd(CELL: tl.constexpr, x0, x1, x2, x3, g0, g1, g2, g3, h, c):
    """(h_new, c_new) of one step; c passes through unchanged for cells without one."""
    if CELL == LSTM:
        h_new, c_new = lstm_fwd(x0, x1, x2, x3, g0, g1, g2, g3, c)
    elif CELL == GRU:
        h_new = gru_fwd(x0, x1, x2, g0, g1, g2, h)
        c_new = c
    elif CELL == RNN_TANH:
        h_new = tanh(x0 + g0)
        c_new = c
    else:
        h_new = relu(x0 + g0)
        c_new = c
    return h_new, c_new


@triton.jit
def cell_bwd(CELL: tl.constexpr, x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh, dc):
    """Gradients of one step given dh (of h_new) and dc (of c_new, LSTM only).

    Returns dxg (d0..d3), dhg (e0..e3; equal to dxg except for the GRU's n gate),
    the direct dh_prev term (GRU only, else 0) and dc_prev (LSTM only, else dc).
    """
    zero = tl.zeros_like(dh)
    if CELL == LSTM:
        d0, d1, d2, d3, dc_prev = lstm_bwd(x0, x1, x2, x3, g0, g1, g2, g3, c, dh, dc)
        e0, e1, e2, e3, dh_direct = d0, d1, d2, d3, zero
    elif CELL == GRU:
        d0, d1, d2, e0, e1, e2, dh_direct = gru_bwd(x0, x1, x2, g0, g1, g2, h, dh)
        d3, e3, dc_prev = zero, zero, dc
    elif CELL == RNN_TANH:
        t = tanh(x0 + g0)
        d0 = dh * (1.0 - t * t)
        d1, d2, d3, e0, e1, e2, e3, dh_direct, dc_prev = zero, zero, zero, d0, zero, zero, zero, zero, dc
    else:
        d0 = tl.where(relu(x0 + g0) <= 0.0, 0.0, dh)  # torch: NaN passes dh on
        d1, d2, d3, e0, e1, e2, e3, dh_direct, dc_prev = zero, zero, zero, d0, zero, zero, zero, zero, dc
    return d0, d1, d2, d3, e0, e1, e2, e3, dh_direct, dc_prev


@triton.jit
def load_gates(ptr, stride, rows, cols, H, mask, G: tl.constexpr):
    """The G gate tiles of rows laid out ``[row, G*H]``, upcast to fp32 (unused ones are 0)."""
    base = ptr + rows * stride + cols
    x0 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.zeros_like(x0)
    x2 = tl.zeros_like(x0)
    x3 = tl.zeros_like(x0)
    if G > 1:
        x1 = tl.load(base + H, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + 2 * H, mask=mask, other=0.0).to(tl.float32)
    if G > 3:
        x3 = tl.load(base + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def store_gates(ptr, stride, rows, cols, H, mask, G: tl.constexpr, d0, d1, d2, d3):
    base = ptr + rows * stride + cols
    ty = ptr.dtype.element_ty
    tl.store(base, d0.to(ty), mask=mask)
    if G > 1:
        tl.store(base + H, d1.to(ty), mask=mask)
        tl.store(base + 2 * H, d2.to(ty), mask=mask)
    if G > 3:
        tl.store(base + 3 * H, d3.to(ty), mask=mask)


@triton.jit
def load_prev(prev_ptr, init_ptr, rows, cols, H, n_prev, mask):
    """A state from before this step: rows < n_prev were computed at the previous step
    (saved at ``prev_ptr``, rows of width H), the others still hold the initial state."""
    from_prev = rows < n_prev
    a = tl.load(prev_ptr + rows * H + cols, mask=mask & from_prev, other=0.0).to(tl.float32)
    b = tl.load(init_ptr + rows * H + cols, mask=mask & (rows >= n_prev), other=0.0)
    return tl.where(from_prev, a, b.to(tl.float32))
