"""Per-step fused pointwise kernels (the "alternating" path), generic over the cell.

The recurrent GEMM of each step runs as a torch matmul (cuBLAS on a GPU); these kernels
replace the ~10 elementwise ops around it with one launch per step, forward and backward.
Tiles are ``[BR rows, BH hidden units]`` of one step's ``n`` active rows; every state row
has width H (a cell that reads h has no projection). The cell's math arrives as the
constexpr functions FWD / BWD (kernels/cells.py); the kernels branch only on its traits:
G gates, HAS_C (a cell state), READS_H (the math reads h_prev), SPLIT_HG (d(hg) != d(xg)).
"""
import triton
import triton.language as tl

from .tiles import load_gates, load_prev, store_gates


@triton.jit
def step_fwd_kernel(xg_ptr, hg_ptr, h_ptr, c_ptr, out_ptr, c_save_ptr, n, H,
                    FWD: tl.constexpr, G: tl.constexpr, HAS_C: tl.constexpr,
                    READS_H: tl.constexpr, WRITE_H: tl.constexpr, SAVE: tl.constexpr,
                    BR: tl.constexpr, BH: tl.constexpr):
    """out[:n] = h_new, and the h state too if WRITE_H; with HAS_C the c state (fp32) =
    c_new, and c_save[:n] = c_new if SAVE (for the backward)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    cols = tl.program_id(1) * BH + tl.arange(0, BH)[None, :]
    mask = (rows < n) & (cols < H)
    x0, x1, x2, x3 = load_gates(xg_ptr, G * H, rows, cols, H, mask, G)
    g0, g1, g2, g3 = load_gates(hg_ptr, G * H, rows, cols, H, mask, G)
    h = tl.zeros_like(x0)
    c = tl.zeros_like(x0)
    if READS_H:
        h = tl.load(h_ptr + rows * H + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_C:
        c = tl.load(c_ptr + rows * H + cols, mask=mask, other=0.0)
    h_new, c_new = FWD(x0, x1, x2, x3, g0, g1, g2, g3, h, c)
    tl.store(out_ptr + rows * H + cols, h_new.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(h_ptr + rows * H + cols, h_new.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_C:
        tl.store(c_ptr + rows * H + cols, c_new, mask=mask)
        if SAVE:
            tl.store(c_save_ptr + rows * H + cols, c_new, mask=mask)


@triton.jit
def step_bwd_kernel(xg_ptr, hg_ptr, h_prev_ptr, h0_ptr, c_prev_ptr, c0_ptr, n_prev,
                    dh_ptr, dy_ptr, dc_ptr, dxg_ptr, dhg_ptr, n, H,
                    BWD: tl.constexpr, G: tl.constexpr, HAS_C: tl.constexpr,
                    READS_H: tl.constexpr, SPLIT_HG: tl.constexpr, HAS_DY: tl.constexpr,
                    BR: tl.constexpr, BH: tl.constexpr):
    """Gradients of one step: dxg[:n]; dhg[:n] with SPLIT_HG; dc[:n] <- dc_prev with HAS_C;
    with READS_H, dh[:n] <- the direct dh_prev term (the caller adds dhg @ W_hh).

    dh is the gradient of h_new (plus dy when HAS_DY); h_prev and c_prev are read with
    ``load_prev`` from the previous step's saved rows (n_prev of them) or the initial state.
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    cols = tl.program_id(1) * BH + tl.arange(0, BH)[None, :]
    mask = (rows < n) & (cols < H)
    x0, x1, x2, x3 = load_gates(xg_ptr, G * H, rows, cols, H, mask, G)
    g0, g1, g2, g3 = load_gates(hg_ptr, G * H, rows, cols, H, mask, G)
    dh = tl.load(dh_ptr + rows * H + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DY:
        dh += tl.load(dy_ptr + rows * H + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.zeros_like(x0)
    c = tl.zeros_like(x0)
    dc = tl.zeros_like(x0)
    if READS_H:
        h = load_prev(h_prev_ptr, h0_ptr, rows, cols, H, n_prev, mask)
    if HAS_C:
        c = load_prev(c_prev_ptr, c0_ptr, rows, cols, H, n_prev, mask)
        dc = tl.load(dc_ptr + rows * H + cols, mask=mask, other=0.0)
    d0, d1, d2, d3, e0, e1, e2, e3, dh_direct, dc_prev = BWD(
        x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh, dc)
    store_gates(dxg_ptr, G * H, rows, cols, H, mask, G, d0, d1, d2, d3)
    if SPLIT_HG:
        store_gates(dhg_ptr, G * H, rows, cols, H, mask, G, e0, e1, e2, e3)
    if READS_H:
        tl.store(dh_ptr + rows * H + cols, dh_direct, mask=mask)
    if HAS_C:
        tl.store(dc_ptr + rows * H + cols, dc_prev, mask=mask)
