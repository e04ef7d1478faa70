"""Tile loads and stores the generic kernels share: a step's gate tiles and the previous
state of each row."""
import triton
import triton.language as tl


@triton.jit
def load_gates(ptr, stride, rows, cols, H, mask, G: tl.constexpr):
    """The G (at most 4) gate tiles of rows laid out ``[row, G*H]``, upcast to fp32; the
    tiles past G are 0."""
    base = ptr + rows * stride + cols
    x0 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.zeros_like(x0)
    x2 = tl.zeros_like(x0)
    x3 = tl.zeros_like(x0)
    if G > 1:
        x1 = tl.load(base + H, mask=mask, other=0.0).to(tl.float32)
    if G > 2:
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
    if G > 2:
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
