// The CUDA kernels, generic over the cell (csrc/cells/*.h): they branch on its traits, never on
// its name. The same source compiles with nvcc for a GPU and with g++ for the CPU emulation
// (device.h). S is the storage type; A = Acc<S>::type is what the math, the cell state and
// the saved gate pre-activations use (fp32 for fp16 and bf16).
//
// Every kernel calls the cell's forward/backward on one hidden unit with its G gate values
// gathered into registers (H = 1, j = 0), so storage and layout never reach the cell's math.
//
// pointwise_*: one step's pointwise math after the recurrent GEMM (run by cuBLAS/torch);
//   the contract of the Triton per-step kernels (fusedrnn/kernels/pointwise.py).
// persistent_*: a whole layer direction in one cooperative launch. Block b owns hidden units
//   [b U, b U + U) of every gate and keeps its slice of W_hh (forward) or of W_hh's columns
//   (backward) in shared memory for the whole sequence; one grid barrier per step.
#pragma once

#include "cuda/device.h"

namespace fusedrnn {
namespace cuda {

// One flat argument block for every kernel (the C entry points take it from Python as is).
// Pointers are void so that one layout serves every storage type; each kernel names the
// types it reads them as. Unused pointers are null.
struct KernelArgs {
  int64_t hidden, batch, steps;  // H, B (rows of the first step), T
  int64_t n, n_prev;             // pointwise: this step's rows, the previous step's rows
  int64_t units;                 // persistent: hidden units per block
  int32_t reverse, save, write_h, has_dy;
  const int32_t* sizes;    // persistent: [T] rows per step (device memory)
  const int32_t* offsets;  // persistent: [T] first packed row per step
  const void *xp, *hg, *h0, *c0, *w_hh, *b_hh, *h_prev, *c_prev, *dy, *dh_n, *dc_n;
  void *h, *c, *y, *out, *hg_all, *c_all, *h_n, *c_n;
  void *dh, *dc, *dxp, *dhg, *dh0, *dc0;
  void* scratch;  // persistent: A-typed state buffers, sized by the caller (cuda_kernels.cpp)
};

template <int G, typename A>
struct Gates {
  A v[G];
};

// One unit's G gate values from a [G H] row (any storage), in A.
template <int G, typename A, typename T>
__device__ __forceinline__ void load_unit(const T* row, int64_t H, int64_t j, A (&out)[G]) {
#pragma unroll
  for (int q = 0; q < G; ++q) out[q] = to_acc(row[q * H + j]);
}

// The cell's forward on one unit (H = 1, j = 0) whose biases are already in x and g; with
// kSave it writes the cell's saved values (the backward recomputes them this way).
template <typename Cell, bool kSave, typename A>
__device__ __forceinline__ A unit_forward(const A (&x)[Cell::kGates], const A (&g)[Cell::kGates],
                                          A h_prev, A& c, A* saved) {
  A zero[Cell::kGates];
#pragma unroll
  for (int q = 0; q < Cell::kGates; ++q) zero[q] = A(0);
  return Cell::template forward<kSave>(x, g, zero, zero, 1, 0, h_prev, c, saved);
}

// ---- per-step pointwise kernels: one thread per (row, hidden unit) ----

// out[:n] = h_new (and the h state if write_h); the c state (A) = c_new, and c_all[:n] = c_new
// if save. xg (= xp rows, b_ih included) and hg (= h W_hh^T + b_hh) are S-typed [n, G H].
// Both pointwise kernels loop over their (row, unit) elements grid-stride, so any grid covers
// any size (the emulation launches a small one: each thread there is an OS thread).
template <typename Cell, typename S>
__device__ __forceinline__ void pointwise_forward_one(const KernelArgs& a, int64_t e);
template <typename Cell, typename S>
__device__ __forceinline__ void pointwise_backward_one(const KernelArgs& a, int64_t e);

template <typename Cell, typename S>
__global__ void pointwise_forward(KernelArgs a) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < a.n * a.hidden;
       e += int64_t(gridDim.x) * blockDim.x)
    pointwise_forward_one<Cell, S>(a, e);
}

template <typename Cell, typename S>
__global__ void pointwise_backward(KernelArgs a) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < a.n * a.hidden;
       e += int64_t(gridDim.x) * blockDim.x)
    pointwise_backward_one<Cell, S>(a, e);
}

template <typename Cell, typename S>
__device__ __forceinline__ void pointwise_forward_one(const KernelArgs& a, int64_t e) {
  using A = typename Acc<S>::type;
  constexpr int G = Cell::kGates;
  const int64_t H = a.hidden;
  const int64_t r = e / H, j = e % H;
  A x[G], g[G];
  load_unit(static_cast<const S*>(a.xp) + r * G * H, H, j, x);
  load_unit(static_cast<const S*>(a.hg) + r * G * H, H, j, g);
  S* h = static_cast<S*>(a.h);
  A* c = static_cast<A*>(a.c);
  A cv = Cell::kCellState ? c[e] : A(0);
  const A h_prev = Cell::kReadsH ? to_acc(h[e]) : A(0);
  const A hv = unit_forward<Cell, false>(x, g, h_prev, cv, (A*)nullptr);
  store(static_cast<S*>(a.out) + e, hv);
  if (a.write_h) store(h + e, hv);
  if (Cell::kCellState) {
    c[e] = cv;
    if (a.save) static_cast<A*>(a.c_all)[e] = cv;
  }
}

// One step's gradients (the Triton step_bwd_kernel's contract): dxp[:n]; dhg[:n] for a cell
// with split hidden gradients; dc[:n] <- dc_prev; for a cell that reads h, dh[:n] <- the
// direct dh_prev term (the caller adds dhg W_hh). h_prev and c_prev rows come from the
// previous step's saved rows (n_prev of them) or else the initial state.
template <typename Cell, typename S>
__device__ __forceinline__ void pointwise_backward_one(const KernelArgs& a, int64_t e) {
  using A = typename Acc<S>::type;
  constexpr int G = Cell::kGates;
  const int64_t H = a.hidden;
  const int64_t r = e / H, j = e % H;
  A x[G], g[G], saved[Cell::kSaved], dx[G], dg[G];
  load_unit(static_cast<const S*>(a.xp) + r * G * H, H, j, x);
  load_unit(static_cast<const S*>(a.hg) + r * G * H, H, j, g);
  const bool from_prev = r < a.n_prev;
  const A h_prev = !Cell::kReadsH ? A(0)
                   : from_prev    ? to_acc(static_cast<const S*>(a.h_prev)[e])
                                  : to_acc(static_cast<const S*>(a.h0)[e]);
  const A c_prev = !Cell::kCellState ? A(0)
                   : from_prev       ? static_cast<const A*>(a.c_prev)[e]
                                     : to_acc(static_cast<const S*>(a.c0)[e]);
  A c_new = c_prev;  // the activations the backward needs, recomputed
  unit_forward<Cell, true>(x, g, h_prev, c_new, saved);
  A* dh = static_cast<A*>(a.dh);
  A* dc = static_cast<A*>(a.dc);
  const A dhv = dh[e] + (a.has_dy ? to_acc(static_cast<const S*>(a.dy)[e]) : A(0));
  A dcv = Cell::kCellState ? dc[e] : A(0);
  const A direct = Cell::backward(saved, 1, 0, h_prev, c_prev, dhv, dcv, dx, dg);
  S* dxp = static_cast<S*>(a.dxp) + r * G * H;
  S* dhg = static_cast<S*>(a.dhg) + r * G * H;
#pragma unroll
  for (int q = 0; q < G; ++q) {
    store(dxp + q * H + j, dx[q]);
    if (Cell::kSplitHiddenGrad) store(dhg + q * H + j, dg[q]);
  }
  if (Cell::kReadsH) dh[e] = direct;
  if (Cell::kCellState) dc[e] = dcv;
}

// ---- persistent kernels ----

// out(r, q) = sum_k x[r ldx + k] w[q K + k] for r < R, q < Q: the block's share of a step's
// recurrent GEMM. A warp computes a tile of kTileR rows x kTileQ q's at once, its lanes over
// k (coalesced, conflict-free), so the tile's FMA chains and reductions overlap and each
// loaded value is used kTileR or kTileQ times; lane 0 hands each result to store(r, q, v).
// Every lane of a warp runs the same iterations (warp_sum_all needs all 32).
constexpr int kTileR = 2, kTileQ = 4;

template <typename A, typename X, typename S, typename Store>
__device__ __forceinline__ void warp_tiled_dots(const X* x, int64_t ldx, const S* w, int64_t K,
                                                int64_t R, int64_t Q, const Store& store) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int64_t r_tiles = (R + kTileR - 1) / kTileR, q_tiles = (Q + kTileQ - 1) / kTileQ;
  for (int64_t tile = warp; tile < r_tiles * q_tiles; tile += warps) {
    const int64_t r0 = (tile / q_tiles) * kTileR, q0 = (tile % q_tiles) * kTileQ;
    const X* xr[kTileR];
    const S* wq[kTileQ];
#pragma unroll
    for (int i = 0; i < kTileR; ++i) xr[i] = x + (r0 + i < R ? r0 + i : R - 1) * ldx;  // clamped:
#pragma unroll
    for (int i = 0; i < kTileQ; ++i) wq[i] = w + (q0 + i < Q ? q0 + i : Q - 1) * K;  // no branch
    A acc[kTileR * kTileQ];
#pragma unroll
    for (int i = 0; i < kTileR * kTileQ; ++i) acc[i] = A(0);
    for (int64_t k = lane; k < K; k += kWarpSize) {
      A xv[kTileR];
#pragma unroll
      for (int i = 0; i < kTileR; ++i) xv[i] = to_acc(xr[i][k]);
#pragma unroll
      for (int q = 0; q < kTileQ; ++q) {
        const A wv = to_acc(wq[q][k]);
#pragma unroll
        for (int i = 0; i < kTileR; ++i) acc[i * kTileQ + q] += xv[i] * wv;
      }
    }
    warp_sum_all(acc);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kTileR; ++i)
#pragma unroll
        for (int q = 0; q < kTileQ; ++q)
          if (r0 + i < R && q0 + q < Q) store(r0 + i, q0 + q, acc[i * kTileQ + q]);
    }
  }
}

// Step k of the loop visits step t; the step the state of step t comes from (-1: initial).
__device__ __forceinline__ int64_t visited(const KernelArgs& a, int64_t k) {
  return a.reverse ? a.steps - 1 - k : k;
}
__device__ __forceinline__ int64_t previous(const KernelArgs& a, int64_t t) {
  const int64_t p = a.reverse ? t + 1 : t - 1;
  return (p >= 0 && p < a.steps) ? p : -1;
}

// Rows of a step the forward computes per round: their pre-activations [rows, G U] sit in
// shared memory, at most kRoundBytes of it (at least 16 rows), so the shared size does not
// grow with the batch. Each round ends in a dependent chain of global loads, so fewer,
// larger rounds are faster (B = 128 in one round where G U is small).
constexpr int64_t kRoundBytes = 16384;

template <typename Cell, typename S>
__host__ __device__ constexpr int64_t persistent_round_rows(int64_t batch, int64_t units) {
  using A = typename Acc<S>::type;
  const int64_t fit = kRoundBytes / (Cell::kGates * units * int64_t(sizeof(A)));
  const int64_t rows = fit > 16 ? fit : 16;
  return batch < rows ? batch : rows;
}

// Shared memory of the forward for U units per block: the W_hh slice [G U, H] (S) and one
// round's recurrent pre-activations [round rows, G U] (A).
template <typename Cell, typename S>
constexpr size_t persistent_forward_shared(int64_t hidden, int64_t batch, int64_t units) {
  using A = typename Acc<S>::type;
  const size_t w = size_t(Cell::kGates) * units * hidden * sizeof(S);
  return (w + 15) / 16 * 16 +
         size_t(persistent_round_rows<Cell, S>(batch, units)) * Cell::kGates * units * sizeof(A);
}

// Scratch (A): h in two buffers (read one, write the other, so no block overwrites an h
// another block still reads) and the c state, each [B, H].
template <typename Cell>
constexpr int64_t persistent_forward_scratch(int64_t hidden, int64_t batch) {
  return (Cell::kCellState ? 3 : 2) * batch * hidden;
}

// y, h_n, c_n of a layer direction from xp (b_ih included); with save, hg_all [rows, G H] (A,
// b_hh included) and c_all [rows, H] (A) for the backward.
template <typename Cell, typename S>
__global__ void persistent_forward(KernelArgs a) {
  using A = typename Acc<S>::type;
  constexpr int G = Cell::kGates;
  const int64_t H = a.hidden, B = a.batch, U = a.units;
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const int64_t Ub = (j0 + U <= H ? U : H - j0);  // this block's units (the last may have fewer)
  const int64_t round_rows = persistent_round_rows<Cell, S>(B, U);
  S* w_s = dynamic_shared<S>();  // [G Ub][H]: row q = gate q / Ub, unit q % Ub
  A* hg_s = reinterpret_cast<A*>(reinterpret_cast<char*>(w_s) +
                                 (size_t(G) * U * H * sizeof(S) + 15) / 16 * 16);  // [round][G Ub]
  const S* w_hh = static_cast<const S*>(a.w_hh);
  for (int64_t i = threadIdx.x; i < G * Ub * H; i += blockDim.x) {
    const int64_t q = i / H, k = i % H;
    w_s[i] = w_hh[((q / Ub) * H + j0 + q % Ub) * H + k];
  }
  A* h_buf = static_cast<A*>(a.scratch);  // [2][B][H]
  A* c_state = h_buf + 2 * B * H;         // [B][H]
  for (int64_t i = threadIdx.x; i < B * Ub; i += blockDim.x) {
    const int64_t e = (i / Ub) * H + j0 + i % Ub;
    h_buf[e] = to_acc(static_cast<const S*>(a.h0)[e]);
    if (Cell::kCellState) c_state[e] = to_acc(static_cast<const S*>(a.c0)[e]);
  }
  grid_sync();  // h0 complete in every block's columns
  const S* xp = static_cast<const S*>(a.xp);
  const S* b_hh = static_cast<const S*>(a.b_hh);
  int cur = 0;
  for (int64_t k = 0; k < a.steps; ++k) {
    const int64_t t = visited(a, k), n = a.sizes[t], off = a.offsets[t];
    const A* h_in = h_buf + cur * B * H;
    A* h_out = h_buf + (1 - cur) * B * H;
    for (int64_t r0 = 0; r0 < n; r0 += round_rows) {
      const int64_t rn = (n - r0 < round_rows ? n - r0 : round_rows);
      // recurrent pre-activations of this block's units for the chunk's rows
      warp_tiled_dots<A>(h_in + r0 * H, H, w_s, H, rn, G * Ub,
                         [&](int64_t r, int64_t q, A v) { hg_s[r * G * Ub + q] = v; });
      __syncthreads();
      for (int64_t i = threadIdx.x; i < rn * Ub; i += blockDim.x) {
        const int64_t r = r0 + i / Ub, u = i % Ub, j = j0 + u, e = r * H + j, row = off + r;
        A x[G], g[G];
        load_unit(xp + row * G * H, H, j, x);
#pragma unroll
        for (int q = 0; q < G; ++q)
          g[q] = hg_s[(i / Ub) * G * Ub + q * Ub + u] + (b_hh ? to_acc(b_hh[q * H + j]) : A(0));
        A cv = Cell::kCellState ? c_state[e] : A(0);
        const A hv = round_to<S>(unit_forward<Cell, false>(x, g, h_in[e], cv, (A*)nullptr));
        h_out[e] = hv;
        store(static_cast<S*>(a.y) + row * H + j, hv);
        if (Cell::kCellState) c_state[e] = cv;
        if (a.save) {
          A* hg_all = static_cast<A*>(a.hg_all) + row * G * H;
#pragma unroll
          for (int q = 0; q < G; ++q) hg_all[q * H + j] = g[q];
          if (Cell::kCellState) static_cast<A*>(a.c_all)[row * H + j] = cv;
        }
      }
      __syncthreads();  // hg_s is free for the next chunk
    }
    for (int64_t i = n * Ub + threadIdx.x; i < B * Ub; i += blockDim.x) {
      const int64_t e = (i / Ub) * H + j0 + i % Ub;
      h_out[e] = h_in[e];  // inactive rows keep their state
    }
    grid_sync();  // h_out complete before any block reads it
    cur = 1 - cur;
  }
  for (int64_t i = threadIdx.x; i < B * Ub; i += blockDim.x) {
    const int64_t e = (i / Ub) * H + j0 + i % Ub;
    store(static_cast<S*>(a.h_n) + e, h_buf[cur * B * H + e]);
    if (Cell::kCellState) store(static_cast<S*>(a.c_n) + e, c_state[e]);
  }
}

// Shared memory of the backward: the W_hh column slice, transposed: [U, G H] (S).
template <typename Cell, typename S>
constexpr size_t persistent_backward_shared(int64_t hidden, int64_t units) {
  return size_t(Cell::kGates) * units * hidden * sizeof(S);
}

// Scratch (A): dh and dc [B, H], and the d(hg) rows [B, G H] of two steps (fp32 for the
// recurrence; dhg, S-typed, is what the weight-gradient GEMM reads). Two, so that a block
// writes step t-1's rows while a slower one still reads step t's.
template <typename Cell>
constexpr int64_t persistent_backward_scratch(int64_t hidden, int64_t batch) {
  return (2 + 2 * Cell::kGates) * batch * hidden;
}

// dxp, dhg (split-gradient cells; else dxp is d(hg)), dh0, dc0 from the forward's saved
// hg_all and c_all (A), y, and the incoming dy, dh_n, dc_n (S). One grid barrier per step:
// each block updates dh and dc of its own units only, and reads the other blocks' d(hg)
// rows after the barrier.
template <typename Cell, typename S>
__global__ void persistent_backward(KernelArgs a) {
  using A = typename Acc<S>::type;
  constexpr int G = Cell::kGates;
  const int64_t H = a.hidden, B = a.batch, U = a.units, GH = G * H;
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const int64_t Ub = (j0 + U <= H ? U : H - j0);
  S* wt_s = dynamic_shared<S>();  // [Ub][G H]: wt_s[u][q] = W_hh[q][j0 + u]
  const S* w_hh = static_cast<const S*>(a.w_hh);
  for (int64_t i = threadIdx.x; i < Ub * GH; i += blockDim.x)
    wt_s[i] = w_hh[(i % GH) * H + j0 + i / GH];
  A* dh = static_cast<A*>(a.scratch);  // [B][H]
  A* dc = dh + B * H;                  // [B][H]
  A* dg_steps = dc + B * H;            // [2][B][G H]
  for (int64_t i = threadIdx.x; i < B * Ub; i += blockDim.x) {
    const int64_t e = (i / Ub) * H + j0 + i % Ub;
    dh[e] = to_acc(static_cast<const S*>(a.dh_n)[e]);
    if (Cell::kCellState) dc[e] = to_acc(static_cast<const S*>(a.dc_n)[e]);
  }
  __syncthreads();
  const S* xp = static_cast<const S*>(a.xp);
  const A* hg_all = static_cast<const A*>(a.hg_all);
  const S* y = static_cast<const S*>(a.y);
  for (int64_t k = a.steps - 1; k >= 0; --k) {
    const int64_t t = visited(a, k), n = a.sizes[t], off = a.offsets[t];
    const int64_t p = previous(a, t);
    const int64_t n_prev = p >= 0 ? a.sizes[p] : 0, off_prev = p >= 0 ? a.offsets[p] : 0;
    A* dg = dg_steps + (k % 2) * B * GH;
    for (int64_t i = threadIdx.x; i < n * Ub; i += blockDim.x) {
      const int64_t r = i / Ub, j = j0 + i % Ub, e = r * H + j, row = off + r;
      A x[G], g[G], saved[Cell::kSaved], dx[G], dgv[G];
      load_unit(xp + row * GH, H, j, x);
      load_unit(hg_all + row * GH, H, j, g);
      const bool from_prev = r < n_prev;
      const A h_prev = !Cell::kReadsH ? A(0)
                       : from_prev    ? to_acc(y[(off_prev + r) * H + j])
                                      : to_acc(static_cast<const S*>(a.h0)[e]);
      const A c_prev = !Cell::kCellState ? A(0)
                       : from_prev       ? static_cast<const A*>(a.c_all)[(off_prev + r) * H + j]
                                         : to_acc(static_cast<const S*>(a.c0)[e]);
      A c_new = c_prev;  // the activations the backward needs, recomputed
      unit_forward<Cell, true>(x, g, h_prev, c_new, saved);
      A dcv = Cell::kCellState ? dc[e] : A(0);
      const A dhv = dh[e] + to_acc(static_cast<const S*>(a.dy)[row * H + j]);
      const A direct = Cell::backward(saved, 1, 0, h_prev, c_prev, dhv, dcv, dx, dgv);
#pragma unroll
      for (int q = 0; q < G; ++q) {
        const A d_hidden = Cell::kSplitHiddenGrad ? dgv[q] : dx[q];
        store(static_cast<S*>(a.dxp) + row * GH + q * H + j, dx[q]);
        if (Cell::kSplitHiddenGrad) store(static_cast<S*>(a.dhg) + row * GH + q * H + j, dgv[q]);
        dg[r * GH + q * H + j] = d_hidden;
      }
      dh[e] = direct;  // the direct term (0 for a cell that does not read h); the GEMM adds on
      if (Cell::kCellState) dc[e] = dcv;
    }
    grid_sync();  // every block's d(hg) rows of this step are written
    // dh_prev[r, j] += sum_q dg[r, q] W_hh[q, j] for this block's units
    warp_tiled_dots<A>(dg, GH, wt_s, GH, n, Ub,
                       [&](int64_t r, int64_t u, A v) { dh[r * H + j0 + u] += v; });
    __syncthreads();  // this block's dh complete before its threads read it at the next step
  }
  for (int64_t i = threadIdx.x; i < B * Ub; i += blockDim.x) {
    const int64_t e = (i / Ub) * H + j0 + i % Ub;
    store(static_cast<S*>(a.dh0) + e, dh[e]);
    if (Cell::kCellState) store(static_cast<S*>(a.dc0) + e, dc[e]);
  }
}

}  // namespace cuda
}  // namespace fusedrnn
