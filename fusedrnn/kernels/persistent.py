"""Persistent kernels: one launch runs a whole layer-direction sequence.

Each program owns BB batch rows for every step. It loads W_hh once, as G gate tiles of
``[HP, HP]`` (HP = H rounded up to a power of two, zero padded), keeps them and the h / c
state on chip across steps (their padded columns held at 0), and streams in each step's
slice of the hoisted input projection. Batch tiles never exchange data, so there is no grid-wide barrier and the
kernel also runs (sequentially) in the interpreter. Rows at or past a step's active count
keep their state (``tl.where``), which handles packed sequences in either direction.

Generic over the cell as the per-step kernels are (pointwise.py): the cell's math arrives as
the constexpr functions FWD / BWD and the kernels branch only on its traits.

Operands of ``tl.dot`` are DOT_DTYPE (the storage dtype; fp32 for bf16 in the interpreter,
whose bf16 dot is wrong); accumulation, gates and the cell state are fp32. fp32 operands use
FP32_PRECISION (see ``fp32_precision``).
"""
import triton
import triton.language as tl

from .tiles import load_gates, load_prev, store_gates


def fp32_precision(arch_major: int) -> str:
    """input_precision of fp32 tl.dot on a GPU: "ieee" (exact products) below sm_90; on
    sm_90+ Triton 3.9's ieee lowering of the persistent LSTM backward crashes LLVM's SLP
    vectorizer, so "tf32x3" (about fp32 accuracy) is used there."""
    return "ieee" if arch_major < 9 else "tf32x3"


@triton.jit
def _dot(a, w, acc, DOT_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """acc + a @ w with fp32 accumulation; FP32_PRECISION applies to fp32 operands."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(DOT_DTYPE), w, acc, input_precision=FP32_PRECISION)
    else:
        return tl.dot(a.to(DOT_DTYPE), w, acc)


@triton.jit
def _load_w(w_ptr, gate, rows, cols, H, TRANSPOSE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Gate tile of W_hh [G*H, H]: ``W_g^T`` (``[k, j] = W[gate*H + j, k]``) or ``W_g``."""
    mask = (rows < H) & (cols < H)
    if TRANSPOSE:
        ptrs = w_ptr + (gate * H + cols) * H + rows
    else:
        ptrs = w_ptr + (gate * H + rows) * H + cols
    return tl.load(ptrs, mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _load_w_gates(w_ptr, rows, cols, H, G: tl.constexpr, TRANSPOSE: tl.constexpr,
                  DOT_DTYPE: tl.constexpr):
    """The G (at most 4) gate tiles of W_hh, loaded once per program (the tiles past G repeat
    gate 0 and are never used)."""
    w0 = _load_w(w_ptr, 0, rows, cols, H, TRANSPOSE, DOT_DTYPE)
    w1 = w0
    w2 = w0
    w3 = w0
    if G > 1:
        w1 = _load_w(w_ptr, 1, rows, cols, H, TRANSPOSE, DOT_DTYPE)
    if G > 2:
        w2 = _load_w(w_ptr, 2, rows, cols, H, TRANSPOSE, DOT_DTYPE)
    if G > 3:
        w3 = _load_w(w_ptr, 3, rows, cols, H, TRANSPOSE, DOT_DTYPE)
    return w0, w1, w2, w3


@triton.jit
def sequence_fwd_kernel(xp_ptr, sizes_ptr, offsets_ptr, T, h0_ptr, c0_ptr, w_ptr, b_ptr,
                        y_ptr, hg_save_ptr, c_save_ptr, hn_ptr, cn_ptr, H,
                        FWD: tl.constexpr, G: tl.constexpr, HAS_C: tl.constexpr,
                        HAS_BIAS: tl.constexpr,
                        REVERSE: tl.constexpr, SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        FP32_PRECISION: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr):
    """y, h_n, c_n; with SAVE (for the backward) also hg (fp32) and c_new (HAS_C) per step."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)[:, None]
    cols = tl.arange(0, HP)[None, :]
    wk = tl.arange(0, HP)[:, None]
    batch = tl.load(sizes_ptr)
    state_mask = (rows < batch) & (cols < H)
    w0, w1, w2, w3 = _load_w_gates(w_ptr, wk, cols, H, G, True, DOT_DTYPE)
    b0, b1, b2, b3 = load_gates(b_ptr, 0, 0 * rows, cols, H, (cols < H) & HAS_BIAS, G)
    h = tl.load(h0_ptr + rows * H + cols, mask=state_mask, other=0.0).to(tl.float32)
    c = tl.zeros_like(h)
    if HAS_C:
        c = tl.load(c0_ptr + rows * H + cols, mask=state_mask, other=0.0).to(tl.float32)
    for s in range(T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        n = tl.load(sizes_ptr + t)
        off = tl.load(offsets_ptr + t)
        mask = (rows < n) & (cols < H)
        g0 = _dot(h, w0, b0, DOT_DTYPE, FP32_PRECISION)
        g1 = g0
        g2 = g0
        g3 = g0
        if G > 1:
            g1 = _dot(h, w1, b1, DOT_DTYPE, FP32_PRECISION)
        if G > 2:
            g2 = _dot(h, w2, b2, DOT_DTYPE, FP32_PRECISION)
        if G > 3:
            g3 = _dot(h, w3, b3, DOT_DTYPE, FP32_PRECISION)
        x0, x1, x2, x3 = load_gates(xp_ptr + off * G * H, G * H, rows, cols, H, mask, G)
        h_new, c_new = FWD(x0, x1, x2, x3, g0, g1, g2, g3, h, c)
        # round h to storage so the state equals what y (and the backward) sees
        h_new = h_new.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + (off + rows) * H + cols, h_new, mask=mask)
        if SAVE:
            store_gates(hg_save_ptr + off * G * H, G * H, rows, cols, H, mask, G,
                        g0, g1, g2, g3)
            if HAS_C:
                tl.store(c_save_ptr + (off + rows) * H + cols, c_new, mask=mask)
        # padded columns stay 0: an inf there would meet W's zero padding as NaN in the dot
        h = tl.where(mask, h_new.to(tl.float32), h)
        c = tl.where(mask, c_new, c)
    tl.store(hn_ptr + rows * H + cols, h.to(hn_ptr.dtype.element_ty), mask=state_mask)
    if HAS_C:
        tl.store(cn_ptr + rows * H + cols, c.to(cn_ptr.dtype.element_ty), mask=state_mask)


@triton.jit
def sequence_bwd_kernel(xp_ptr, hg_save_ptr, y_ptr, h0_ptr, c_save_ptr, c0_ptr,
                        sizes_ptr, offsets_ptr, T, w_ptr, dy_ptr, dhn_ptr, dcn_ptr,
                        dxp_ptr, dhg_ptr, dh0_ptr, dc0_ptr, H,
                        BWD: tl.constexpr, G: tl.constexpr, HAS_C: tl.constexpr,
                        READS_H: tl.constexpr, SPLIT_HG: tl.constexpr, REVERSE: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
                        BB: tl.constexpr, HP: tl.constexpr):
    """Walks the steps backwards: dxp, dhg (SPLIT_HG; else dhg == dxp), dh0, dc0.

    dh and dc stay on chip; dh_prev = direct term + sum_g dhg_g @ W_g with W_g on chip.
    h_prev / c_prev come from the saved y / c of the previous step or from h0 / c0.
    """
    rows = tl.program_id(0) * BB + tl.arange(0, BB)[:, None]
    cols = tl.arange(0, HP)[None, :]
    wj = tl.arange(0, HP)[:, None]
    batch = tl.load(sizes_ptr)
    state_mask = (rows < batch) & (cols < H)
    w0, w1, w2, w3 = _load_w_gates(w_ptr, wj, cols, H, G, False, DOT_DTYPE)
    dh = tl.load(dhn_ptr + rows * H + cols, mask=state_mask, other=0.0).to(tl.float32)
    dc = tl.zeros_like(dh)
    if HAS_C:
        dc = tl.load(dcn_ptr + rows * H + cols, mask=state_mask, other=0.0).to(tl.float32)
    for s in range(T):
        if REVERSE:
            t = s
            p = t + 1
        else:
            t = T - 1 - s
            p = t - 1
        has_prev = (p >= 0) & (p < T)
        p = tl.minimum(tl.maximum(p, 0), T - 1)
        n_prev = tl.where(has_prev, tl.load(sizes_ptr + p), 0)
        off_prev = tl.load(offsets_ptr + p)
        n = tl.load(sizes_ptr + t)
        off = tl.load(offsets_ptr + t)
        mask = (rows < n) & (cols < H)
        x0, x1, x2, x3 = load_gates(xp_ptr + off * G * H, G * H, rows, cols, H, mask, G)
        g0, g1, g2, g3 = load_gates(hg_save_ptr + off * G * H, G * H, rows, cols, H, mask, G)
        dh_out = dh + tl.load(dy_ptr + (off + rows) * H + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.zeros_like(dh)
        c = tl.zeros_like(dh)
        if READS_H:
            h = load_prev(y_ptr + off_prev * H, h0_ptr, rows, cols, H, n_prev, mask)
        if HAS_C:
            c = load_prev(c_save_ptr + off_prev * H, c0_ptr, rows, cols, H, n_prev, mask)
        d0, d1, d2, d3, e0, e1, e2, e3, dh_direct, dc_prev = BWD(
            x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh_out, dc)
        store_gates(dxp_ptr + off * G * H, G * H, rows, cols, H, mask, G, d0, d1, d2, d3)
        if SPLIT_HG:
            store_gates(dhg_ptr + off * G * H, G * H, rows, cols, H, mask, G, e0, e1, e2, e3)
        dh_prev = _dot(e0, w0, dh_direct, DOT_DTYPE, FP32_PRECISION)
        if G > 1:
            dh_prev = _dot(e1, w1, dh_prev, DOT_DTYPE, FP32_PRECISION)
        if G > 2:
            dh_prev = _dot(e2, w2, dh_prev, DOT_DTYPE, FP32_PRECISION)
        if G > 3:
            dh_prev = _dot(e3, w3, dh_prev, DOT_DTYPE, FP32_PRECISION)
        # padded columns of dh stay 0, as h's in the forward (dc's follow from dh's); a
        # full-mask form of this spills the fp32 LSTM backward on sm_90
        dh = tl.where(rows < n, tl.where(cols < H, dh_prev, 0.0), dh)
        dc = tl.where(rows < n, dc_prev, dc)
    tl.store(dh0_ptr + rows * H + cols, dh.to(dh0_ptr.dtype.element_ty), mask=state_mask)
    if HAS_C:
        tl.store(dc0_ptr + rows * H + cols, dc.to(dc0_ptr.dtype.element_ty), mask=state_mask)
