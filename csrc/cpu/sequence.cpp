// Sequence loops for every cell. Each thread owns a block of rows and runs the whole time loop
// for it: per step the recurrent GEMM and the fused, vectorized pointwise pass from
// csrc/cells/*.h, by one of two GEMM routes (GemmRoute). Only rows [0, batch_sizes[t]) of step
// t are touched, so packed input runs natively.
#include "cpu/sequence.h"

#include "cpu/buffer_cache.h"

// Only the ATen operators used, not ATen/ATen.h: the build parses these headers once per unit.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cells/cells.h"
#include "cpu/vec512.h"

// torch's MKL (when it has one): a thread-local thread count, to keep tiny per-step GEMMs off
// the thread pool. Weak, so that a torch built without MKL still loads the extension.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
// torch's MKL packed-weight GEMM (LP64 ints, CBLAS enums as ints), weak for the same reason.
extern "C" size_t cblas_sgemm_pack_get_size(int, int, int, int) __attribute__((weak));
extern "C" void cblas_sgemm_pack(int, int, int, int, int, int, float, const float*, int, float*)
    __attribute__((weak));
extern "C" void cblas_sgemm_compute(int, int, int, int, int, int, const float*, int, const float*,
                                    int, float, float*, int) __attribute__((weak));
// torch's BLAS (Fortran interface, column-major), for the unpacked per-step GEMMs without an
// ATen op around them; weak, with at::mm_out as the fallback.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*) __attribute__((weak));
extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*,
                       const double*, const double*, const int*, const double*, const int*,
                       const double*, double*, const int*) __attribute__((weak));

namespace fusedrnn {
namespace cpu {
namespace {

using at::Tensor;

// Per-step row counts and the offset of each step's first row.
struct Steps {
  std::vector<int64_t> size, offset;
  int64_t count() const { return static_cast<int64_t>(size.size()); }
  // The order the forward pass visits the steps in (backward visits them reversed).
  int64_t visit(int64_t k, bool reverse) const { return reverse ? count() - 1 - k : k; }
};

Steps make_steps(const Tensor& batch_sizes, int64_t rows) {
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong &&
                  batch_sizes.dim() == 1 && batch_sizes.numel() > 0,
              "fusedrnn: batch_sizes must be a non-empty 1-D int64 CPU tensor");
  Steps s;
  auto sizes = batch_sizes.contiguous();
  const int64_t* p = sizes.data_ptr<int64_t>();
  int64_t off = 0;
  for (int64_t t = 0; t < sizes.numel(); ++t) {
    TORCH_CHECK(p[t] >= 0 && (t == 0 || p[t] <= p[t - 1]),
                "fusedrnn: batch_sizes must be non-negative and non-increasing");
    TORCH_CHECK(p[t] <= rows - off, "fusedrnn: batch_sizes sum past the input's ", rows,
                " rows");  // (before the sum can overflow)
    s.size.push_back(p[t]);
    s.offset.push_back(off);
    off += p[t];
  }
  TORCH_CHECK(off == rows, "fusedrnn: batch_sizes sum to ", off, " but the input has ", rows,
              " rows");
  return s;
}

Tensor cached_clone(const Tensor& t) { return cached_empty(t.sizes(), t.options()).copy_(t); }

template <typename T>
T* ptr(const Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

// Rows never interact (h W^T is row by row), so the batch is cut into one contiguous row block
// per thread and each thread runs the WHOLE time loop for its rows: one parallel region per
// call, no barrier per step. Blocks get equal row-steps (longer sequences sit in lower rows).
struct Block {
  int64_t index, begin, end;
};
constexpr int64_t kMinRowsPerBlock = 8;  // below this a block's GEMM gets too thin to pay

std::vector<Block> row_blocks(const Steps& steps) {
  const int64_t B = steps.size[0];
  const int64_t count = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), B / kMinRowsPerBlock));
  std::vector<int64_t> length(B, 0);  // steps row b is active in
  int64_t total = 0;
  for (int64_t n : steps.size) {
    total += n;
    for (int64_t b = 0; b < n; ++b) ++length[b];
  }
  std::vector<Block> blocks;
  int64_t begin = 0, done = 0;
  for (int64_t b = 0; b < B; ++b) {
    done += length[b];
    const int64_t cut = static_cast<int64_t>(blocks.size()) + 1;
    if (cut < count && b + 1 < B && done * count >= total * cut) {
      blocks.push_back({cut - 1, begin, b + 1});
      begin = b + 1;
    }
  }
  blocks.push_back({static_cast<int64_t>(blocks.size()), begin, B});
  return blocks;
}

// Per-step GEMMs below this many flops run on one thread: waking the pool costs more.
constexpr int64_t kSerialGemmFlops = int64_t(1) << 22;

// Pins MKL to one thread on this thread while alive (no-op without MKL).
struct SerialBlas {
  bool active;
  int previous = 0;
  explicit SerialBlas(bool on) : active(on && MKL_Set_Num_Threads_Local != nullptr) {
    if (active) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (active) MKL_Set_Num_Threads_Local(previous);
  }
};

// Runs f(block) for every block, one per thread. A single block runs on the calling thread,
// outside any parallel region, so that a large per-step GEMM (step_flops) may still use MKL's
// threads; inside the parallel region MKL runs each thread's GEMMs serially.
template <typename F>
void for_each_block(const std::vector<Block>& blocks, int64_t step_flops, const F& f) {
  if (blocks.size() == 1) {
    SerialBlas serial(step_flops < kSerialGemmFlops);
    return f(blocks[0]);
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(blocks[i]);
  });
}

// Whole-sequence GEMMs, cut by hand: one chunk of rows per thread, each chunk's GEMM run by
// MKL on that thread alone. On the tall-skinny shapes here ([rows, 64] x [64, 256] and its
// transposes) MKL's own 2-thread split measured ~2.4x slower than this (bench/gemm_routes.py).
constexpr int64_t kMinRowsPerChunk = 256;

int64_t row_chunks(int64_t rows, int64_t flops) {
  if (flops < kSerialGemmFlops) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinRowsPerChunk));
}

// out[rows, N] = a[rows, K] @ b[K, N], rows split across threads.
void mm_rows_out(Tensor& out, const Tensor& a, const Tensor& b) {
  const int64_t rows = a.size(0);
  const int64_t chunks = row_chunks(rows, 2 * rows * a.size(1) * b.size(1));
  if (chunks == 1) {
    at::mm_out(out, a, b);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    c10::NoGradGuard no_grad;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = rows * i / chunks, r1 = rows * (i + 1) / chunks;
      Tensor out_chunk = out.narrow(0, r0, r1 - r0);
      at::mm_out(out_chunk, a.narrow(0, r0, r1 - r0), b);
    }
  });
}

// A per-step GEMM's weight packed once per layer call in MKL's internal GEMM layout, so that
// `out = a op(W)` does not re-pack W on every step (MKL's sgemm does, ~5 % of LSTM inference).
// Only float32 with MKL, and only when every step GEMM has at least kPackMinRows rows and there
// are kPackMinSteps steps: for a handful of rows MKL's unpacked path (gemv-like) is faster and
// for a few steps the pack does not amortize.
constexpr int64_t kPackMinRows = 8, kPackMinSteps = 4;

template <typename T>
struct PackedWeight {
  Tensor buffer;  // empty: not packed, BLAS on `w` as given
  const T* w = nullptr;
  int64_t n = 0, k = 0;
  bool transpose = false;

  // op(W) = W^T when `transpose`, else W (contiguous).
  static PackedWeight make(const Tensor& w, bool transpose, int64_t max_rows, int64_t min_rows,
                           int64_t steps) {
    PackedWeight p;
    p.w = ptr<T>(w);
    p.transpose = transpose;
    p.n = w.size(transpose ? 0 : 1);
    p.k = w.size(transpose ? 1 : 0);
    if (!std::is_same<T, float>::value || cblas_sgemm_pack == nullptr ||
        cblas_sgemm_compute == nullptr || cblas_sgemm_pack_get_size == nullptr ||
        min_rows < kPackMinRows || steps < kPackMinSteps || p.k == 0)
      return p;
    constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162;
    const int n = static_cast<int>(p.n), k = static_cast<int>(p.k);
    const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, max_rows, n, k);
    p.buffer = cached_empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
                            w.options().dtype(at::kFloat));
    cblas_sgemm_pack(kRowMajor, kBMatrix, transpose ? kTrans : kNoTrans, max_rows, n, k, 1.0f,
                     w.data_ptr<float>(), static_cast<int>(w.size(1)), p.buffer.data_ptr<float>());
    return p;
  }

  // out[m, n] = a[m, k] op(W) (+ out when `accumulate`), rows contiguous (strides k and n).
  // Straight to BLAS, no ATen op: a small step (batch 1) costs a few microseconds less.
  void mm(int64_t m, const T* a, T* out, bool accumulate = false) const {
    if (buffer.defined()) {
      constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151;
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m),
                          static_cast<int>(n), static_cast<int>(k),
                          reinterpret_cast<const float*>(a), static_cast<int>(k),
                          buffer.data_ptr<float>(), static_cast<int>(k), accumulate ? 1.0f : 0.0f,
                          reinterpret_cast<float*>(out), static_cast<int>(n));
      return;
    }
    // Column-major BLAS: out^T [n, m] = op(W)^T [n, k] a^T [k, m].
    const char op_w = transpose ? 'T' : 'N', op_a = 'N';
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int ldw = std::max(transpose ? ki : ni, 1), lda = std::max(ki, 1), ldo = std::max(ni, 1);
    const T one = 1, beta = accumulate ? 1 : 0;
    if constexpr (std::is_same<T, float>::value) {
      if (sgemm_ != nullptr && k > 0)
        return sgemm_(&op_w, &op_a, &ni, &mi, &ki, &one, w, &ldw, a, &lda, &beta, out, &ldo);
    } else {
      if (dgemm_ != nullptr && k > 0)
        return dgemm_(&op_w, &op_a, &ni, &mi, &ki, &one, w, &ldw, a, &lda, &beta, out, &ldo);
    }
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    const Tensor w_t = at::from_blob(const_cast<T*>(w), transpose ? at::IntArrayRef{n, k}
                                                                    : at::IntArrayRef{k, n}, opts);
    const Tensor a_t = at::from_blob(const_cast<T*>(a), {m, k}, opts);
    Tensor out_t = at::from_blob(out, {m, n}, opts);
    if (accumulate)
      out_t.addmm_(a_t, transpose ? w_t.t() : w_t);
    else
      at::mm_out(out_t, a_t, transpose ? w_t.t() : w_t);
  }
};

// The largest and smallest block (rows of a step GEMM at the batch's widest step).
std::pair<int64_t, int64_t> block_rows(const std::vector<Block>& blocks) {
  int64_t max_rows = 0, min_rows = blocks[0].end - blocks[0].begin;
  for (const Block& blk : blocks) {
    max_rows = std::max(max_rows, blk.end - blk.begin);
    min_rows = std::min(min_rows, blk.end - blk.begin);
  }
  return {max_rows, min_rows};
}

// The recurrent GEMMs' route. Forward, kMkl: per step one MKL GEMM over the block's rows into
// the gate buffer, then one pointwise pass over it; kOnednnTiles: per step and tile of
// kTileUnits hidden units, oneDNN's brgemm micro-kernel (JIT-compiled for this CPU) computes
// the tile's G gate columns and the pointwise pass runs on them while they are still in cache;
// kAvx512 (AVX-512 builds): our micro-kernel (UnitPanels) computes all gates of a few rows,
// and the pass runs on those rows from L1. Backward, per step d(hg) W_hh: one MKL GEMM, or
// brgemm over column panels of W_hh (no per-step packing of d(hg)). Which is faster depends on
// the shape and the machine (on an Intel Xeon with AMX: forward MKL and the tiles within 5 %
// up to hidden 200, MKL 10-25 % faster at 500, avx512 5-20 % faster up to hidden 128 and at
// batch 1; backward panels 15-25 % faster from hidden 128 up, slower at batch 1), so it is measured
// per pass and float32 layer shape at first use (pick_route) unless FUSEDRNN_CPU_GEMM names
// one. float64 runs MKL; a bfloat16 module's bf16 weights always run the tiles, on bf16
// operands (PanelGemm).
enum class GemmRoute { kMkl, kOnednnTiles, kAvx512 };

const char* route_name(GemmRoute r) {
  return r == GemmRoute::kMkl ? "mkl" : r == GemmRoute::kOnednnTiles ? "onednn" : "avx512";
}

// Whether the float32 forward's pointwise pass runs on AVX-512 vectors (vec512.h): where the
// build has AVX-512, unless FUSEDRNN_CPU_AVX512=0 asks for the compiler-vectorized float loop
// (the path of builds without it; for tests and A/B runs). Read once per process.
bool avx512_pointwise() {
#if FUSEDRNN_VEC512
  static const bool on = [] {
    const char* v = std::getenv("FUSEDRNN_CPU_AVX512");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
#else
  return false;
#endif
}

// A route forced by FUSEDRNN_CPU_GEMM ("mkl", "onednn" or "avx512"); unset or "auto": measure.
c10::optional<GemmRoute> forced_route() {
  const char* v = std::getenv("FUSEDRNN_CPU_GEMM");
  if (v == nullptr || *v == 0 || std::strcmp(v, "auto") == 0) return c10::nullopt;
  if (std::strcmp(v, "mkl") == 0) return GemmRoute::kMkl;
  if (std::strcmp(v, "onednn") == 0) return GemmRoute::kOnednnTiles;
  if (std::strcmp(v, "avx512") == 0) return GemmRoute::kAvx512;
  TORCH_CHECK(false, "fusedrnn: FUSEDRNN_CPU_GEMM must be mkl, onednn, avx512 or auto, got '", v,
              "'");
}

// Units per tile, and columns per panel: oneDNN packs VNNI panels at most 64 columns wide.
constexpr int64_t kTileUnits = 64;

// A GEMM c = a b cut into column panels of b, each run by oneDNN's brgemm micro-kernel: `b`
// ([K, N], any strides) is packed once per layer call, one contiguous [k, width] panel per
// listed column range in list order; `a` is a scratch of rows that each step loads (a copy:
// the forward's tiles overwrite h as they go). float32, or for a bfloat16 module's weights bf16
// operands with fp32 accumulation, in the VNNI layout where oneDNN wants it (K padded to even
// with a zero row and column, panels 16-64 columns wide).
struct PanelGemm {
  bool bf16 = false, vnni = false;
  int64_t k = 0;                      // K as the GEMMs see it
  std::vector<int64_t> at, width, ld;  // per panel: offset in `panels`, columns, row stride
  Tensor panels, a;

  // `cols`: the (first column, width <= 64) of each panel; `rows`: a's rows. The panels are
  // filled by plain loops over b's strides (b is often a transposed view): ATen copies and a
  // zeroed scratch tensor per panel cost ~270 us per call for a bf16 LSTM of 200 units.
  static PanelGemm make(const Tensor& b, const std::vector<std::pair<int64_t, int64_t>>& cols,
                        int64_t rows, const at::TensorOptions& opts) {
    PanelGemm p;
    p.bf16 = b.scalar_type() == at::kBFloat16;
    p.vnni = p.bf16 && at::native::cpublas::could_pack(at::kBFloat16);
    const int64_t K = b.size(0);
    p.k = p.vnni ? (K + 1) / 2 * 2 : K;
    const auto type = p.bf16 ? opts.dtype(at::kBFloat16) : opts.dtype(at::kFloat);
    int64_t size = 0, widest = 0;
    for (const auto& [first, w] : cols) {
      p.at.push_back(size);
      p.width.push_back(w);
      p.ld.push_back(p.vnni ? (w + 15) / 16 * 16 : w);
      size += p.k * p.ld.back();
      widest = std::max(widest, p.ld.back());
    }
    p.panels = cached_empty({size}, type);
    p.a = at::zeros({rows, p.k}, type);  // the padding column stays zero
    if (p.bf16)
      p.fill_panels<at::BFloat16>(b, cols, widest);
    else
      p.fill_panels<float>(b, cols, widest);
    return p;
  }

  // Panel i = b[:, cols[i]] as [k, ld[i]] rows, zero-padded; VNNI-packed for bf16 (through a
  // scratch panel). The panels are independent: the intra-op threads fill them in parallel
  // (the fill is a strided transposition, ~0.5 ns an element; 200 units have 16 panels).
  template <typename E>
  void fill_panels(const Tensor& b, const std::vector<std::pair<int64_t, int64_t>>& cols,
                   int64_t widest) {
    const int64_t K = b.size(0), s0 = b.stride(0), s1 = b.stride(1);
    const E* src = b.data_ptr<E>();
    E* const out = panels.data_ptr<E>();
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, k * widest));
    at::parallel_for(0, static_cast<int64_t>(cols.size()), grain, [&](int64_t begin,
                                                                      int64_t end) {
      std::vector<E> scratch(vnni ? static_cast<size_t>(k * widest) : 0);
      for (int64_t i = begin; i < end; ++i) {
        const auto [first, w] = cols[i];
        E* dst = vnni ? scratch.data() : out + at[i];
        std::fill(dst, dst + k * ld[i], E(0.0f));
        if (s0 <= s1) {  // b's columns are contiguous-ish: read down each column
          for (int64_t j = 0; j < w; ++j)
            for (int64_t r = 0; r < K; ++r) dst[r * ld[i] + j] = src[r * s0 + (first + j) * s1];
        } else {
          for (int64_t r = 0; r < K; ++r)
            for (int64_t j = 0; j < w; ++j) dst[r * ld[i] + j] = src[r * s0 + (first + j) * s1];
        }
        if (vnni)
          at::native::cpublas::pack(k, ld[i], ld[i], ld[i], at::kBFloat16, at::kBFloat16, dst,
                                    out + at[i]);
      }
    });
  }

  // Rows [r0, r0 + n) of a = src (float32, `width` <= k wide, contiguous rows).
  void load_a(int64_t r0, int64_t n, const float* src, int64_t width) {
    if (!bf16) {
      std::memcpy(a.data_ptr<float>() + r0 * k, src, n * width * sizeof(float));
      return;
    }
    at::BFloat16* out = a.data_ptr<at::BFloat16>() + r0 * k;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < width; ++j) out[r * k + j] = at::BFloat16(src[r * width + j]);
  }

  // c[n, width(i)] (row stride ldc) (+)= rows [r0, r0 + n) of a times panel i.
  void gemm(int64_t r0, int64_t n, size_t i, float* c, int64_t ldc, bool add = false) const {
    if (bf16)
      at::native::cpublas::brgemm(n, width[i], k, k, ld[i], ldc, add,
                                  a.data_ptr<at::BFloat16>() + r0 * k,
                                  panels.data_ptr<at::BFloat16>() + at[i], c, vnni);
    else
      at::native::cpublas::brgemm(n, width[i], k, k, ld[i], ldc, add, a.data_ptr<float>() + r0 * k,
                                  panels.data_ptr<float>() + at[i], c, /*is_vnni=*/false);
  }
};

#if FUSEDRNN_VEC512
constexpr bool kAvx512Gemm = true;

// out[j] = column j of the 16 rows r (16 floats each), by lane shuffles.
inline void transpose16x16(const __m512 (&r)[16], __m512 (&out)[16]) {
  __m512 t[16], s[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // s[4i + m], 128-bit lane L: column 4L + m of rows 4i..4i+3
    s[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {  // a 4 x 4 transpose of 128-bit lanes per m
    const __m512 u0 = _mm512_shuffle_f32x4(s[m], s[4 + m], 0x44);
    const __m512 u1 = _mm512_shuffle_f32x4(s[m], s[4 + m], 0xEE);
    const __m512 u2 = _mm512_shuffle_f32x4(s[8 + m], s[12 + m], 0x44);
    const __m512 u3 = _mm512_shuffle_f32x4(s[8 + m], s[12 + m], 0xEE);
    out[m] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    out[4 + m] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    out[8 + m] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    out[12 + m] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
}

// The forward's step GEMM on our own AVX-512 micro-kernel (GemmRoute::kAvx512), for the small
// recurrent GEMMs where MKL's per-call packing of h and its whole-width output (the gates
// leave L1 before the pointwise pass reads them) cost most. W_hh^T is packed once per layer
// call into panels of 16 hidden units, [Hout][G][16] each (units past H zero), so that a tile
// of R rows x 16 units x G gates accumulates in R * G registers over k, with one broadcast of
// h per row and k. The forward runs it on blocks of R rows, each block's gates written to the
// same few rows of scratch that the pointwise pass reads next, from L1.
struct UnitPanels {
  static constexpr int kAccumulators = 24;  // of the 32 zmm registers; the rest: W and h
  Tensor panels;
  int64_t G = 0, H = 0, K = 0, chunks = 0;

  static constexpr int rows_per_tile(int64_t G) { return G == 1 ? 12 : kAccumulators / G; }

  // w_hh: [G * H, K] float32.
  static UnitPanels make(const Tensor& w_hh, int64_t G) {
    UnitPanels p;
    p.G = G, p.H = w_hh.size(0) / G, p.K = w_hh.size(1), p.chunks = (p.H + 15) / 16;
    p.panels = cached_empty({p.chunks * p.K * G * 16}, w_hh.options());
    const Tensor w = w_hh.contiguous();
    const float* src = w.data_ptr<float>();
    float* out = p.panels.data_ptr<float>();
    // Per 16 units, gate and 16 k: a 16 x 16 block transposed in registers (rows past H zero).
    for (int64_t c = 0; c < p.chunks; ++c)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t k0 = 0; k0 < p.K; k0 += 16) {
          const __mmask16 m = cells::F32x16::lanes(p.K - k0);
          __m512 rows[16], cols[16];
          for (int64_t l = 0; l < 16; ++l)
            rows[l] = c * 16 + l < p.H
                          ? _mm512_maskz_loadu_ps(m, src + (g * p.H + c * 16 + l) * p.K + k0)
                          : _mm512_setzero_ps();
          transpose16x16(rows, cols);
          for (int64_t i = 0; i < std::min<int64_t>(16, p.K - k0); ++i)
            _mm512_store_ps(out + ((c * p.K + k0 + i) * G + g) * 16, cols[i]);
        }
    return p;
  }

  // out[r, g * H + u] = sum_k h[r, k] W_hh[g * H + u, k] for R rows and the 16 units of a panel
  // from unit j (lanes `m` of them valid).
  template <int G, int R>
  static void tile(const float* h, int64_t ldh, const float* panel, int64_t K, float* out,
                   int64_t ldo, int64_t H, int64_t j, __mmask16 m) {
    __m512 acc[R][G];
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      __m512 w[G];
      for (int g = 0; g < G; ++g) w[g] = _mm512_load_ps(panel + (k * G + g) * 16);
      for (int r = 0; r < R; ++r) {
        const __m512 hb = _mm512_set1_ps(h[r * ldh + k]);
        for (int g = 0; g < G; ++g) acc[r][g] = _mm512_fmadd_ps(hb, w[g], acc[r][g]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) _mm512_mask_storeu_ps(out + r * ldo + g * H + j, m, acc[r][g]);
  }

  template <int G, int R>
  void rows(const float* h, int64_t ldh, float* out) const {
    const float* base = panels.data_ptr<float>();
    for (int64_t c = 0; c < chunks; ++c)
      tile<G, R>(h, ldh, base + c * K * G * 16, K, out, G * H, H, c * 16,
                 cells::F32x16::lanes(H - c * 16));
  }

  // out [n, G * H] (row stride G * H) = h [n, K] (row stride ldh) W_hh^T, n <= rows_per_tile.
  template <int G, int R = rows_per_tile(G)>
  void mm(int64_t n, const float* h, int64_t ldh, float* out) const {
    if constexpr (R > 1) {
      if (n < R) return mm<G, R - 1>(n, h, ldh, out);
    }
    rows<G, R>(h, ldh, out);
  }
};
#else
constexpr bool kAvx512Gemm = false;
#endif

// The forward tiles' panels of W_hh^T: per tile of kTileUnits units, one per gate.
std::vector<std::pair<int64_t, int64_t>> gate_tiles(int64_t G, int64_t H) {
  std::vector<std::pair<int64_t, int64_t>> cols;
  for (int64_t u0 = 0; u0 < H; u0 += kTileUnits)
    for (int64_t g = 0; g < G; ++g) cols.push_back({g * H + u0, std::min(H - u0, kTileUnits)});
  return cols;
}

// Panels of at most 64 columns over all N columns.
std::vector<std::pair<int64_t, int64_t>> column_panels(int64_t N) {
  std::vector<std::pair<int64_t, int64_t>> cols;
  for (int64_t c0 = 0; c0 < N; c0 += kTileUnits) cols.push_back({c0, std::min(N - c0, kTileUnits)});
  return cols;
}

// Why the onednn route cannot run here ("" when it can): torch runs oneDNN's brgemm only where
// oneDNN is enabled (torch.backends.mkldnn) and the CPU has at least AVX2; it raises otherwise.
std::string onednn_unavailable_reason() {
  if (!at::globalContext().userEnabledMkldnn()) return "torch.backends.mkldnn is disabled";
  static const std::string probe = [] {
    try {
      float a = 1, b = 1, c = 0;
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c, false);
      at::native::cpublas::brgemm_release(false);
      return c == 1 ? std::string() : std::string("oneDNN's brgemm gave a wrong 1x1 product");
    } catch (const std::exception& e) {  // c10::Error, or oneDNN's own
      return std::string(e.what());
    }
  }();
  return probe;
}

// Why the tiles cannot take bf16 operands here ("" when they can): oneDNN's bf16 brgemm needs
// AVX-512 (AVX512_BF16 or AMX to be fast).
std::string bf16_tiles_unavailable_reason() {
  const std::string base = onednn_unavailable_reason();
  if (!base.empty()) return base;
  static const std::string probe = [] {
    try {
      const bool vnni = at::native::cpublas::could_pack(at::kBFloat16);
      // a [1, 2] times b [2, 16] (b's first column 3, 4): the narrowest panel the tiles pack
      std::vector<at::BFloat16> a = {1, 2}, b(32, 0), packed(32, 0);
      b[0] = 3, b[16] = 4;
      std::vector<float> c(16, 0);
      if (vnni)
        at::native::cpublas::pack(2, 16, 16, 16, at::kBFloat16, at::kBFloat16, b.data(),
                                  packed.data());
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a.data(),
                                  vnni ? packed.data() : b.data(), c.data(), vnni);
      at::native::cpublas::brgemm_release(vnni);
      return c[0] == 11 ? std::string() : std::string("oneDNN's bf16 brgemm gave a wrong product");
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
  }();
  return probe;
}

// The measured choices, one per pass, layer shape and thread count, kept for the process
// (like cuDNN's benchmark mode). The training forward has its own: it also stores what the
// backward reads, which shifts the balance between the routes.
enum class Pass { kInference, kTraining, kBackward };
const char* pass_name(Pass p) {
  return p == Pass::kInference ? "" : p == Pass::kTraining ? " training" : " backward";
}
using RouteKey = std::tuple<std::string, Pass, int64_t, int64_t, int64_t, bool, int>;  // cell, pass, B, H, Hout, proj, threads
struct RouteRecord {
  GemmRoute route;
  double us[3];  // per route (GemmRoute's order), per step, the best of the rounds; -1: not run
};

struct RouteTable {
  std::mutex lock;
  std::map<RouteKey, RouteRecord> records;
};

RouteTable& route_table() {
  static RouteTable* table = new RouteTable();  // never destroyed: ops may run at exit
  return *table;
}

c10::optional<GemmRoute> recorded_route(const RouteKey& key) {
  std::lock_guard<std::mutex> guard(route_table().lock);
  const auto found = route_table().records.find(key);
  if (found == route_table().records.end()) return c10::nullopt;
  return found->second.route;
}

// The first steps of a call, as a sequence of their own: what a route probe runs. Up to 16
// steps, fewer for wide layers, so that one run stays within ~2 GFLOP.
std::pair<Steps, int64_t> probe_head(const Steps& steps, int64_t step_flops) {
  const int64_t probe_steps = std::clamp<int64_t>((int64_t(1) << 31) / step_flops, 2, 16);
  Steps head;
  int64_t rows = 0;
  for (int64_t t = 0; t < std::min(steps.count(), probe_steps); ++t) {
    head.size.push_back(steps.size[t]);
    head.offset.push_back(steps.offset[t]);
    rows += steps.size[t];
  }
  return {head, rows};
}

// Why our AVX-512 step GEMM cannot run here ("" when it can): it is compiled only into builds
// for CPUs with AVX-512F (setup.py builds for the machine it runs on).
std::string avx512_gemm_unavailable_reason() {
  return kAvx512Gemm
             ? ""
             : "this build has no AVX-512 (FUSEDRNN_ARCH_FLAGS without it, or a CPU without it)";
}

// A pass's GEMM route for a float32 call: forced by FUSEDRNN_CPU_GEMM, recorded for its key, or
// measured now among the routes that can run here (MKL always; the oneDNN tiles where torch
// runs oneDNN; our AVX-512 micro-kernel in the forward of an AVX-512 build): `run(route, reps)`
// runs the call's first steps (probe_head) `reps` times and returns the microseconds per step;
// the routes run interleaved, best of three rounds. Past 1 GFLOP per step every route is
// GEMM-bound and a probe would cost seconds, so MKL runs unmeasured (as it does with nothing
// to measure). The backward has no AVX-512 route: forced, it runs MKL.
template <typename Run>
GemmRoute pick_route(const RouteKey& key, int64_t step_flops, int64_t head_steps,
                     const Run& run) {
  const bool backward = std::get<1>(key) == Pass::kBackward;
  const std::string onednn = onednn_unavailable_reason(),
                    avx512 = backward ? "no backward route" : avx512_gemm_unavailable_reason();
  if (const auto forced = forced_route()) {
    TORCH_CHECK(*forced != GemmRoute::kOnednnTiles || onednn.empty(),
                "fusedrnn: FUSEDRNN_CPU_GEMM=onednn, but it cannot run here: ", onednn);
    if (*forced == GemmRoute::kAvx512) {
      TORCH_CHECK(backward || avx512.empty(),
                  "fusedrnn: FUSEDRNN_CPU_GEMM=avx512, but it cannot run here: ", avx512);
      return backward ? GemmRoute::kMkl : GemmRoute::kAvx512;
    }
    return *forced;
  }
  // (a recorded onednn choice is measured again once torch.backends.mkldnn is switched off)
  const auto known = recorded_route(key);
  if (known && (*known != GemmRoute::kOnednnTiles || onednn.empty())) return *known;
  std::vector<GemmRoute> others;
  if (onednn.empty()) others.push_back(GemmRoute::kOnednnTiles);
  if (avx512.empty()) others.push_back(GemmRoute::kAvx512);
  if (others.empty() || step_flops == 0 || step_flops > (int64_t(1) << 30))
    return GemmRoute::kMkl;
  run(GemmRoute::kMkl, 1);  // warm: buffers, the JIT
  for (const GemmRoute r : others) run(r, 1);
  // Rounds of at least ~1 ms each, so that a small layer's probe is not one timer tick.
  const double first = run(GemmRoute::kMkl, 1) * head_steps;
  const int reps = static_cast<int>(std::clamp(1000.0 / std::max(first, 1.0), 1.0, 64.0));
  RouteRecord record{GemmRoute::kMkl, {1e300, -1, -1}};
  auto us = [&](GemmRoute r) -> double& { return record.us[static_cast<int>(r)]; };
  for (const GemmRoute r : others) us(r) = 1e300;
  others.insert(others.begin(), GemmRoute::kMkl);
  for (int round = 0; round < 3; ++round)
    for (const GemmRoute r : others) us(r) = std::min(us(r), run(r, reps));
  // Another route must beat MKL by 5 %: the forward probe's short, cache-warm run favoured the
  // oneDNN tiles by ~3 % on shapes (LSTM hidden 128, 2 threads) where whole calls ran 5-10 %
  // faster on MKL.
  double best_us = 0.95 * us(GemmRoute::kMkl);
  for (const GemmRoute r : others)
    if (us(r) < best_us) best_us = us(r), record.route = r;
  std::lock_guard<std::mutex> guard(route_table().lock);
  route_table().records[key] = record;
  return record.route;
}

// Microseconds per step of `reps` runs of f over `steps` steps.
template <typename F>
double us_per_step(int reps, int64_t steps, const F& f) {
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) f();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
             .count() / (reps * steps);
}

template <typename Cell, typename T>
struct Kernel {
  static constexpr int G = Cell::kGates, S = Cell::kSaved;

  // One step's pointwise forward on `n` consecutive rows (all pointers at the first row).
  // kProj: h goes to proj_in (multiplied by W_hr afterwards) instead of to y and the state.
  // kSave: write the activations backward needs (inference skips those stores).
  // Units [j0, j1) of each row (a tile; all units: 0, H). float32 runs 16 units at a time on
  // AVX-512 where the build has it (vec512.h), unless FUSEDRNN_CPU_AVX512=0. xg's rows are
  // `xs` apart: G * H, or 0 for one row of zeros when hg already holds xg (forward, fold).
  template <bool kProj, bool kSave>
  static void pointwise_forward(int64_t n, int64_t H, const T* xg, int64_t xs, const T* hg,
                                const T* bias_x,
                                const T* bias_h, T* h_state, T* c_state, T* save, T* y,
                                T* proj_in, int64_t j0, int64_t j1) {
#if FUSEDRNN_VEC512
    if constexpr (std::is_same<T, float>::value) {
      if (avx512_pointwise()) {
        pointwise_forward_x16<kProj, kSave>(n, H, xg, xs, hg, bias_x, bias_h, h_state, c_state,
                                            save, y, proj_in, j0, j1);
        return;
      }
    }
#endif
    for (int64_t b = 0; b < n; ++b) {
      const T* __restrict__ xr = xg + b * xs;
      const T* __restrict__ hr = hg + b * G * H;
      const T* __restrict__ bx = bias_x;
      const T* __restrict__ bh = bias_h;
      T* __restrict__ sr = save + b * S * H;
      T* cr = Cell::kCellState ? c_state + b * H : nullptr;
      if constexpr (kProj) {
        T* __restrict__ pr = proj_in + b * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          T c = cr[j];
          pr[j] = Cell::template forward<kSave>(xr, hr, bx, bh, H, j, T(0), c, sr);
          cr[j] = c;
        }
      } else {
        T* hs = h_state + b * H;
        T* __restrict__ yr = y + b * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          T c = Cell::kCellState ? cr[j] : T(0);
          const T h = Cell::template forward<kSave>(xr, hr, bx, bh, H, j, hs[j], c, sr);
          if constexpr (Cell::kCellState) cr[j] = c;
          hs[j] = h;
          yr[j] = h;
        }
      }
    }
  }

#if FUSEDRNN_VEC512
  // pointwise_forward on F32x16: the cell's forward on 16 units of a row at once, each gate's
  // values a vector (as the CUDA kernels give it registers: H = 1, j = 0). Rows outermost, so
  // that memory is read in order (the gate rows can come from DRAM); the last chunk of a row
  // masks its lanes.
  template <bool kProj, bool kSave>
  static void pointwise_forward_x16(int64_t n, int64_t H, const float* xg, int64_t xs,
                                    const float* hg,
                                    const float* bias_x, const float* bias_h, float* h_state,
                                    float* c_state, float* save, float* y, float* proj_in,
                                    int64_t j0, int64_t j1) {
    using V = cells::F32x16;
    for (int64_t b = 0; b < n; ++b) {
      const float* xr = xg + b * xs;
      const float* hr = hg + b * G * H;
      for (int64_t j = j0; j < j1; j += 16) {
        const __mmask16 m = V::lanes(j1 - j);
        V xv[G], hv[G], bx[G], bh[G], sv[S];
        for (int g = 0; g < G; ++g) {
          xv[g] = V::load(xr + g * H + j, m);
          hv[g] = V::load(hr + g * H + j, m);
          bx[g] = V::load(bias_x + g * H + j, m);
          bh[g] = V::load(bias_h + g * H + j, m);
        }
        V c = Cell::kCellState ? V::load(c_state + b * H + j, m) : V(0.0f);
        const V h_prev = Cell::kReadsH && !kProj ? V::load(h_state + b * H + j, m) : V(0.0f);
        const V h = Cell::template forward<kSave>(xv, hv, bx, bh, 1, 0, h_prev, c, sv);
        if (Cell::kCellState) c.store(c_state + b * H + j, m);
        if (kProj) {
          h.store(proj_in + b * H + j, m);
        } else {
          h.store(h_state + b * H + j, m);
          h.store(y + b * H + j, m);
        }
        if (kSave)
          for (int s = 0; s < S; ++s) sv[s].store(save + b * S * H + s * H + j, m);
      }
    }
  }
#endif

  static std::vector<Tensor> forward(const Tensor& xp, const Steps& steps, const Tensor& h0,
                                     const Tensor& c0, const Tensor& w_hh, const Tensor& bias_x,
                                     const Tensor& bias_h, const Tensor& w_hr, bool reverse,
                                     bool train, GemmRoute route, bool xp_scratch = false) {
    const int64_t rows = xp.size(0), B = h0.size(0), H = w_hh.size(0) / G;
    const int64_t Hout = h0.size(1);
    const bool proj = w_hr.defined();
    auto opts = xp.options();
    Tensor y = cached_empty({rows, Hout}, opts);
    Tensor h_state = cached_clone(h0);
    Tensor c_state = Cell::kCellState ? cached_clone(c0) : at::empty({0}, opts);
    Tensor hg = cached_empty({B, G * H}, opts);
    // Saved for backward (train only).
    Tensor act = cached_empty({train ? rows : 0, S * H}, opts);
    Tensor h_prev = cached_empty({train ? rows : 0, Hout}, opts);
    Tensor c_prev = cached_empty({train && Cell::kCellState ? rows : 0, H}, opts);
    Tensor proj_in = cached_empty({proj ? (train ? rows : B) : 0, H}, opts);
    const Tensor w_hr_t = proj ? w_hr.t() : Tensor();
    const int64_t step_flops = 2 * B * Hout * G * H;
    const std::vector<Block> blocks = row_blocks(steps);
    const auto rows_range = block_rows(blocks);
    // A bf16 w_hh (a bfloat16 module) runs the tiles with bf16 operands.
    const bool tiles = route == GemmRoute::kOnednnTiles || w_hh.scalar_type() == at::kBFloat16;
    const bool own = kAvx512Gemm && !tiles && route == GemmRoute::kAvx512 &&
                     std::is_same<T, float>::value;
    const PackedWeight<T> w_hh_packed =
        tiles || own ? PackedWeight<T>()
                     : PackedWeight<T>::make(w_hh, /*transpose=*/true, rows_range.first,
                                             rows_range.second, steps.count());
#if FUSEDRNN_VEC512
    const UnitPanels own_panels = own ? UnitPanels::make(w_hh, G) : UnitPanels();
#endif
    // fold: the MKL route accumulates each step's h W_hh^T into xp's rows (a cell that sums
    // the two: !kSplitHiddenGrad) where the caller lets it overwrite xp, so that the pass
    // reads one [rows, G * H] stream instead of two (LSTM copy inference: 13.7 % of the
    // time in the pass, with xp and the GEMM's output each 1 MB per step). The route probe
    // runs without it (it must not write the call's xp), so it times MKL a little slow.
    const bool fold = xp_scratch && !Cell::kSplitHiddenGrad && !tiles && !own;
    const Tensor zero_row = fold ? at::zeros({G * H}, opts) : Tensor();
    PanelGemm tile_ops =
        tiles ? PanelGemm::make(w_hh.t(), gate_tiles(G, H), B, opts) : PanelGemm();
    auto* const pointwise = proj ? (train ? pointwise_forward<true, true>
                                          : pointwise_forward<true, false>)
                                 : (train ? pointwise_forward<false, true>
                                          : pointwise_forward<false, false>);
    for_each_block(blocks, step_flops, [&](const Block& blk) {
      c10::NoGradGuard no_grad;  // worker threads start with grad mode on
      const int64_t r0 = blk.begin;
      for (int64_t k = 0; k < steps.count(); ++k) {
        const int64_t t = steps.visit(k, reverse), n = steps.size[t];
        if (n <= r0) continue;
        const int64_t nb = std::min(n, blk.end) - r0, row = steps.offset[t] + r0;
        T* const h_blk = ptr<T>(h_state) + r0 * Hout;
        if (train) {
          std::memcpy(ptr<T>(h_prev) + row * Hout, h_blk, nb * Hout * sizeof(T));
          if (Cell::kCellState)
            std::memcpy(ptr<T>(c_prev) + row * H, ptr<T>(c_state) + r0 * H, nb * H * sizeof(T));
        }
        const int64_t save_row = train ? row : r0;  // proj_in is scratch in inference
        T* save = train ? ptr<T>(act) + row * S * H : nullptr;
        const T* xg = ptr<T>(xp) + row * G * H;
        T* hg_rows = ptr<T>(hg) + r0 * G * H;
        T* c_blk = Cell::kCellState ? ptr<T>(c_state) + r0 * H : nullptr;
        T* pin = proj ? ptr<T>(proj_in) + save_row * H : nullptr;
        T* h_out = proj ? nullptr : h_blk;
        T* y_out = proj ? nullptr : ptr<T>(y) + row * H;
        if (tiles) {
          if constexpr (std::is_same<T, float>::value) {
            tile_ops.load_a(r0, nb, h_blk, Hout);
            for (int64_t u0 = 0, panel = 0; u0 < H; u0 += kTileUnits) {
              for (int64_t g = 0; g < G; ++g, ++panel)
                tile_ops.gemm(r0, nb, panel, hg_rows + g * H + u0, G * H);
              pointwise(nb, H, xg, G * H, hg_rows, ptr<T>(bias_x), ptr<T>(bias_h), h_out, c_blk,
                        save, y_out, pin, u0, std::min(H, u0 + kTileUnits));
            }
          }
        } else if (own) {
#if FUSEDRNN_VEC512
          if constexpr (std::is_same<T, float>::value) {
            // R rows at a time: their gates go to the block's first R rows of hg, and the pass
            // reads them from L1. Each row's GEMM reads only its own h, which the pass then
            // overwrites, so a block's later rows still see the previous step's state.
            constexpr int64_t R = UnitPanels::rows_per_tile(G);
            for (int64_t b = 0; b < nb; b += R) {
              const int64_t m = std::min(R, nb - b);
              own_panels.mm<G>(m, h_blk + b * Hout, Hout, hg_rows);
              pointwise(m, H, xg + b * G * H, G * H, hg_rows, ptr<T>(bias_x), ptr<T>(bias_h),
                        proj ? nullptr : h_out + b * H, c_blk ? c_blk + b * H : nullptr,
                        save ? save + b * S * H : nullptr, proj ? nullptr : y_out + b * H,
                        proj ? pin + b * H : nullptr, 0, H);
            }
          }
#endif
        } else if (fold) {
          T* const gates = ptr<T>(xp) + row * G * H;
          w_hh_packed.mm(nb, h_blk, gates, /*accumulate=*/true);
          pointwise(nb, H, ptr<T>(zero_row), 0, gates, ptr<T>(bias_x), ptr<T>(bias_h), h_out,
                    c_blk, save, y_out, pin, 0, H);
        } else {
          w_hh_packed.mm(nb, h_blk, hg_rows);
          pointwise(nb, H, xg, G * H, hg_rows, ptr<T>(bias_x), ptr<T>(bias_h), h_out, c_blk,
                    save, y_out, pin, 0, H);
        }
        if (proj) {
          Tensor y_blk = y.narrow(0, row, nb);
          at::mm_out(y_blk, proj_in.narrow(0, save_row, nb), w_hr_t);
          h_state.narrow(0, r0, nb).copy_(y_blk);
        }
      }
      if (tiles) at::native::cpublas::brgemm_release(tile_ops.vnni);
    });
    if (!train)  // distinct empties: no two outputs of an op may alias (torch.compile)
      for (Tensor* t : {&act, &h_prev, &c_prev, &proj_in}) *t = at::empty({0}, opts);
    return {y, h_state, c_state, act, h_prev, c_prev, proj_in};
  }

  // The forward's GEMM route for a call (pick_route): float64 and a zero-width h run MKL (no
  // step GEMM to tile); the probe runs the call's own pass (inference or training) on its input.
  static GemmRoute choose_route(const std::string& cell, const Tensor& xp, const Steps& steps,
                                const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                                const Tensor& bias_x, const Tensor& bias_h, const Tensor& w_hr,
                                bool train) {
    if (!std::is_same<T, float>::value || h0.size(1) == 0) return GemmRoute::kMkl;
    const RouteKey key{cell, train ? Pass::kTraining : Pass::kInference, steps.size[0],
                       w_hh.size(0) / G, h0.size(1), w_hr.defined(), at::get_num_threads()};
    const int64_t step_flops = 2 * steps.size[0] * h0.size(1) * w_hh.size(0);
    const auto [head, rows] = probe_head(steps, std::max<int64_t>(step_flops, 1));
    const Tensor xp_head = xp.narrow(0, 0, rows);
    return pick_route(key, step_flops, head.count(), [&](GemmRoute route, int reps) {
      return us_per_step(reps, head.count(), [&] {
        forward(xp_head, head, h0, c0, w_hh, bias_x, bias_h, w_hr, false, train, route);
      });
    });
  }

  // One step's pointwise backward on `n` consecutive rows (pointers at the first row). dh of
  // each row is dh_state + dy (kProj: dy is the gradient already projected back through W_hr).
  // Writes d(xg), d(hg) and the state gradients, and adds the column sums of d(xg), d(hg)
  // (the bias gradients) to the block's dbx / dbh while the rows are still in cache, in
  // double: a float32 running sum over a block's rows (every step) drifted past 1e-5 of
  // float64 on a bias entry that cancels, where torch's own float32 reduction did not.
  template <bool kProj>
  static void pointwise_backward(int64_t n, int64_t H, const T* save, const T* h_prev,
                                 const T* c_prev, const T* dy, T* dh_state, T* dc_state, T* dxg,
                                 T* dhg, double* dbx_blk, double* dbh_blk) {
    double* __restrict__ dbx = dbx_blk;
    double* __restrict__ dbh = dbh_blk;
    for (int64_t b = 0; b < n; ++b) {
      const T* __restrict__ sr = save + b * S * H;
      const T* __restrict__ cp = Cell::kCellState ? c_prev + b * H : nullptr;
      T* dc = Cell::kCellState ? dc_state + b * H : nullptr;
      T* __restrict__ dxr = dxg + b * G * H;
      T* __restrict__ dhr = Cell::kSplitHiddenGrad ? dhg + b * G * H : nullptr;
      if constexpr (kProj) {
        const T* __restrict__ dhp = dy + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          T dcj = dc[j];
          Cell::backward(sr, H, j, T(0), cp[j], dhp[j], dcj, dxr, dhr);
          dc[j] = dcj;
        }
      } else {
        T* dhs = dh_state + b * H;
        const T* __restrict__ hp = h_prev + b * H;
        const T* __restrict__ dyr = dy + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          T dcj = Cell::kCellState ? dc[j] : T(0);
          const T direct = Cell::backward(sr, H, j, hp[j], Cell::kCellState ? cp[j] : T(0),
                                          dhs[j] + dyr[j], dcj, dxr, dhr);
          if constexpr (Cell::kCellState) dc[j] = dcj;
          if constexpr (Cell::kSplitHiddenGrad) dhs[j] = direct;
        }
      }
#pragma omp simd
      for (int64_t k = 0; k < G * H; ++k) dbx[k] += static_cast<double>(dxr[k]);
      if constexpr (Cell::kSplitHiddenGrad) {
#pragma omp simd
        for (int64_t k = 0; k < G * H; ++k) dbh[k] += static_cast<double>(dhr[k]);
      }
    }
  }

  static std::vector<Tensor> backward(const Steps& steps, const Tensor& w_hh, const Tensor& w_hr,
                                      bool reverse, const Tensor& act, const Tensor& h_prev,
                                      const Tensor& c_prev, const Tensor& proj_in,
                                      const Tensor& grad_y, const Tensor& grad_hn,
                                      const Tensor& grad_cn, GemmRoute route,
                                      bool weight_grads = true) {
    const int64_t rows = act.size(0), B = grad_hn.size(0), H = w_hh.size(0) / G;
    const int64_t Hout = grad_hn.size(1);
    const bool proj = w_hr.defined();
    auto opts = act.options();
    Tensor dh_state = cached_clone(grad_hn);
    Tensor dc_state = Cell::kCellState ? cached_clone(grad_cn) : at::empty({0}, opts);
    Tensor dxg = cached_empty({rows, G * H}, opts);
    Tensor dhg = Cell::kSplitHiddenGrad ? cached_empty({rows, G * H}, opts) : dxg;
    Tensor dh_total = cached_empty({proj ? rows : 0, Hout}, opts);  // dh per step, for dW_hr
    Tensor dproj_in = cached_empty({proj ? B : 0, H}, opts);
    const std::vector<Block> blocks = row_blocks(steps);
    // Per-block partial bias gradients, summed after the loop.
    const int64_t nblocks = static_cast<int64_t>(blocks.size());
    Tensor dbx_part = at::zeros({nblocks, G * H}, opts.dtype(at::kDouble));
    Tensor dbh_part = Cell::kSplitHiddenGrad ? at::zeros_like(dbx_part) : dbx_part;
    const auto rows_range = block_rows(blocks);
    // The step GEMMs d(hg) W_hh: MKL (packed W_hh) or oneDNN's brgemm in column panels of
    // W_hh, by the measured route; a bf16 w_hh (a bfloat16 module) always runs the panels, on
    // bf16 operands.
    const bool bf16 = w_hh.scalar_type() == at::kBFloat16;
    const bool tiles =
        std::is_same<T, float>::value && (bf16 || route == GemmRoute::kOnednnTiles);
    const PackedWeight<T> w_hh_packed =
        tiles ? PackedWeight<T>()
              : PackedWeight<T>::make(w_hh, /*transpose=*/false, rows_range.first,
                                      rows_range.second, steps.count());
    PanelGemm dh_ops = tiles ? PanelGemm::make(w_hh, column_panels(Hout), B, opts) : PanelGemm();
    for_each_block(blocks, 2 * B * Hout * G * H, [&](const Block& blk) {
      c10::NoGradGuard no_grad;
      const int64_t r0 = blk.begin;
      double* dbx = ptr<double>(dbx_part) + blk.index * G * H;
      double* dbh = ptr<double>(dbh_part) + blk.index * G * H;
      for (int64_t k = steps.count() - 1; k >= 0; --k) {
        const int64_t t = steps.visit(k, reverse), n = steps.size[t];
        if (n <= r0) continue;
        const int64_t nb = std::min(n, blk.end) - r0, row = steps.offset[t] + r0;
        T* const dh_blk = ptr<T>(dh_state) + r0 * Hout;
        const T* save = ptr<T>(act) + row * S * H;
        T* dxg_blk = ptr<T>(dxg) + row * G * H;
        T* dhg_blk = ptr<T>(dhg) + row * G * H;
        T* dc_blk = Cell::kCellState ? ptr<T>(dc_state) + r0 * H : nullptr;
        if (proj) {
          Tensor dh_t = dh_total.narrow(0, row, nb), dproj_blk = dproj_in.narrow(0, r0, nb);
          at::add_out(dh_t, dh_state.narrow(0, r0, nb), grad_y.narrow(0, row, nb));
          at::mm_out(dproj_blk, dh_t, w_hr);
          pointwise_backward<true>(nb, H, save, nullptr, ptr<T>(c_prev) + row * H,
                                   ptr<T>(dproj_blk), nullptr, dc_blk, dxg_blk, dhg_blk, dbx, dbh);
        } else {
          pointwise_backward<false>(nb, H, save, ptr<T>(h_prev) + row * Hout,
                                    Cell::kCellState ? ptr<T>(c_prev) + row * H : nullptr,
                                    ptr<T>(grad_y) + row * Hout, dh_blk, dc_blk, dxg_blk,
                                    dhg_blk, dbx, dbh);
        }
        // GRU: the cell already wrote its direct term into dh.
        if (!tiles) {
          w_hh_packed.mm(nb, dhg_blk, dh_blk, Cell::kSplitHiddenGrad);
        } else if constexpr (std::is_same<T, float>::value) {
          dh_ops.load_a(r0, nb, dhg_blk, G * H);
          for (size_t i = 0; i < dh_ops.width.size(); ++i)
            dh_ops.gemm(r0, nb, i, dh_blk + i * kTileUnits, Hout,
                        Cell::kSplitHiddenGrad);
        }
      }
      if (tiles) at::native::cpublas::brgemm_release(dh_ops.vnni);
    });
    if (!weight_grads) return {};  // (a route probe: it times the step loop only)
    // Weight gradients: a few large GEMMs over all rows instead of one per step (bf16
    // operands for a bfloat16 module: its gradient is rounded to bf16 anyway).
    Tensor dw_hh = bf16 ? at::mm(dhg.to(at::kBFloat16).t(), h_prev.to(at::kBFloat16)).to(at::kFloat)
                        : mm_tn(dhg, h_prev);
    Tensor db_ih = dbx_part.sum(0).to(opts.dtype());
    // One bias gradient serves both biases when d(hg) = d(xg); a copy, so that no two outputs
    // of the op alias (torch.compile assumes they do not).
    Tensor db_hh = Cell::kSplitHiddenGrad ? dbh_part.sum(0).to(opts.dtype()) : db_ih.clone();
    Tensor dw_hr = proj ? mm_tn(dh_total, proj_in) : at::empty({0}, opts);
    return {dxg, dh_state, dc_state, dw_hh, db_hh, dw_hr, db_ih};
  }

  // The backward's GEMM route for a call (pick_route), measured apart from the forward's: here
  // oneDNN's panels skip MKL's per-step packing of d(hg) (LSTM hidden 128: the backward 21 %
  // faster) but lose at batch 1. The probe runs the step loop of the backward of the call's
  // first steps (the weight-gradient GEMMs after it are the same on both routes).
  static GemmRoute choose_backward_route(const std::string& cell, const Steps& steps,
                                         const Tensor& w_hh, const Tensor& w_hr, bool reverse,
                                         const Tensor& act, const Tensor& h_prev,
                                         const Tensor& c_prev, const Tensor& proj_in,
                                         const Tensor& grad_y, const Tensor& grad_hn,
                                         const Tensor& grad_cn) {
    if (!std::is_same<T, float>::value || w_hh.size(1) == 0) return GemmRoute::kMkl;
    const RouteKey key{cell, Pass::kBackward, steps.size[0], w_hh.size(0) / G, w_hh.size(1),
                       w_hr.defined(), at::get_num_threads()};
    const int64_t step_flops = 2 * steps.size[0] * w_hh.size(1) * w_hh.size(0);
    const auto [head, rows] = probe_head(steps, std::max<int64_t>(step_flops, 1));
    auto first_rows = [rows = rows](const Tensor& t) {
      return t.size(0) == 0 ? t : t.narrow(0, 0, rows);
    };
    const Tensor a = first_rows(act), hp = first_rows(h_prev), cp = first_rows(c_prev),
                 pi = first_rows(proj_in), gy = first_rows(grad_y);
    return pick_route(key, step_flops, head.count(), [&](GemmRoute route, int reps) {
      return us_per_step(reps, head.count(), [&] {
        backward(head, w_hh, w_hr, reverse, a, hp, cp, pi, gy, grad_hn, grad_cn, route, false);
      });
    });
  }
};

// Calls f with the cell type named `cell` (csrc/cells/cells.h lists them).
template <typename F>
void with_cell(const std::string& cell, F&& f) {
#define FUSEDRNN_CELL_CASE(NAME, TYPE) \
  if (cell == NAME) return f(cells::TYPE{});
  FUSEDRNN_FOR_EACH_CELL(FUSEDRNN_CELL_CASE)
#undef FUSEDRNN_CELL_CASE
  TORCH_CHECK(false, "fusedrnn: unknown cell '", cell, "'");
}

// The ops are public through torch.ops, so every tensor argument is checked before a pointer
// is taken from it: a wrong device, dtype, shape or layout is a RuntimeError, never a read or
// write past a buffer. `shape` entries of -1 match any size.
void check_tensor(const char* op, const char* what, const Tensor& t, at::ScalarType dtype,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is required");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", what, " must be ", dtype, " like the input, got ",
              t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  int64_t d = 0;
  for (int64_t size : shape) ok = ok && (size < 0 || t.size(d) == size), ++d;
  TORCH_CHECK(ok, op, ": ", what, " must have shape ", at::IntArrayRef(shape),
              " (-1: any size), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

void check_absent(const char* op, const char* what, const Tensor& t, const char* why) {
  TORCH_CHECK(!t.defined(), op, ": ", what, " must be None ", why);
}

at::ScalarType float_dtype(const char* op, const Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": float32 or float64 tensors only, got ", dtype);
  return dtype;
}

Tensor given(const c10::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// The two GEMM ops: 2-D CPU operands of one float dtype whose shapes fit (`shapes_fit`).
void check_gemm_operands(const char* op, const Tensor& a, const Tensor& b, bool shapes_fit) {
  TORCH_CHECK(shapes_fit, op, ": operands of shapes ", a.sizes(), " and ", b.sizes(),
              " do not fit");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() &&
                  float_dtype(op, a) == b.scalar_type(),
              op, ": two CPU tensors of one float dtype, got ", a.scalar_type(), " on ",
              a.device(), " and ", b.scalar_type(), " on ", b.device());
}

}  // namespace

std::vector<std::string> cell_names() {
  std::vector<std::string> names;
#define FUSEDRNN_CELL_NAME(NAME, TYPE) names.push_back(NAME);
  FUSEDRNN_FOR_EACH_CELL(FUSEDRNN_CELL_NAME)
#undef FUSEDRNN_CELL_NAME
  return names;
}

std::vector<int64_t> cell_traits(const std::string& cell) {
  std::vector<int64_t> traits;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    traits = {Cell::kGates, Cell::kCellState ? 2 : 1, Cell::kReadsH, Cell::kSplitHiddenGrad,
              Cell::kSaved};
  });
  return traits;
}

std::string onednn_route_reason() { return onednn_unavailable_reason(); }
std::string bf16_route_reason() { return bf16_tiles_unavailable_reason(); }
std::string avx512_route_reason() { return avx512_gemm_unavailable_reason(); }
std::string pointwise_isa() { return avx512_pointwise() ? "avx512" : "compiler-vectorized"; }

std::vector<std::string> gemm_routes() {
  std::vector<std::string> out;
  std::lock_guard<std::mutex> guard(route_table().lock);
  for (const auto& [key, record] : route_table().records) {
    const auto& [cell, pass, B, H, Hout, proj, threads] = key;
    std::ostringstream line;
    line << cell << pass_name(pass) << " batch " << B << " hidden " << H;
    if (proj) line << " proj " << Hout;
    line << ", " << threads << " threads: " << route_name(record.route) << " (per step:";
    for (const GemmRoute r : {GemmRoute::kMkl, GemmRoute::kOnednnTiles, GemmRoute::kAvx512})
      if (record.us[static_cast<int>(r)] >= 0)
        line << (r == GemmRoute::kMkl ? " " : ", ") << route_name(r) << " "
             << record.us[static_cast<int>(r)] << " us";
    line << ")";
    out.push_back(line.str());
  }
  return out;
}

// out[rows, N] (float32) = a[rows, K] b[K, N] on bf16 operands (a bfloat16 module's input
// projection): oneDNN's brgemm over the intra-op threads' row chunks, written in float32
// straight into the cached buffer, instead of a bf16 result widened into a fresh one.
void mm_rows_bf16_out(Tensor& out, const Tensor& a, const Tensor& b) {
  const int64_t rows = a.size(0), K = a.size(1), N = b.size(1);
  if (K == 0 || !bf16_tiles_unavailable_reason().empty()) {
    out.copy_(at::mm(a, b));
    return;
  }
  PanelGemm p = PanelGemm::make(b, column_panels(N), 0, a.options());
  p.a = p.k == K && a.is_contiguous() ? a : at::zeros({rows, p.k}, a.options());
  if (!p.a.is_same(a)) p.a.narrow(1, 0, K).copy_(a);  // K padded to even for VNNI
  constexpr int64_t kChunk = 64;  // rows per brgemm call
  at::parallel_for(0, rows, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r += kChunk)
      for (size_t i = 0; i < p.width.size(); ++i)
        p.gemm(r, std::min(kChunk, end - r), i, out.data_ptr<float>() + r * N + i * kTileUnits,
               N);
    at::native::cpublas::brgemm_release(p.vnni);
  });
}

Tensor mm_rows(const Tensor& a, const Tensor& b) {
  constexpr const char* op = "fusedrnn::mm_rows";
  const bool fits = a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0);
  if (a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(fits, op, ": operands of shapes ", a.sizes(), " and ", b.sizes(), " do not fit");
    TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": CPU tensors only");
    Tensor out = cached_empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
    c10::NoGradGuard no_grad;
    mm_rows_bf16_out(out, a.detach(), b.detach());
    return out;
  }
  check_gemm_operands(op, a, b, fits);
  Tensor out = cached_empty({a.size(0), b.size(1)}, a.options());
  mm_rows_out(out, a.detach(), b.detach());
  return out;
}

// a[rows, M]^T @ b[rows, N] (the weight gradients), one GEMM on MKL's own threads. When b is
// thin (M >= 8 N: dW_ih of a narrow input) it is computed as (b^T a)^T and transposed: MKL
// runs that operand order ~2x faster there (smnist [512,3584]x[3584,28]: 158 vs 78 GFLOP/s,
// 2 threads, bench/gemm_routes.py), and about equal or slower on the squarer shapes.
// Splitting the rows into per-thread chunks and summing the partials, the previous route,
// was slower than both.
Tensor mm_tn(const Tensor& a, const Tensor& b) {
  check_gemm_operands("fusedrnn::mm_tn", a, b,
                      a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0));
  c10::NoGradGuard no_grad;
  Tensor out = cached_empty({a.size(1), b.size(1)}, a.options());
  if (a.size(1) < 8 * b.size(1)) return at::mm_out(out, a.t(), b);
  Tensor out_t = cached_empty({b.size(1), a.size(1)}, a.options());
  at::mm_out(out_t, b.t(), a);
  return out.copy_(out_t.t());
}

namespace {

// sequence_forward; `xp_scratch`: xp is the caller's own buffer, which the kernel may
// overwrite (Kernel::forward's fold), as stack_forward's projections are.
std::vector<Tensor> run_sequence_forward(const std::string& cell, const Tensor& xp,
                                         const Tensor& batch_sizes, const Tensor& h0,
                                         const c10::optional<Tensor>& c0, const Tensor& w_hh,
                                         const c10::optional<Tensor>& b_ih,
                                         const c10::optional<Tensor>& b_hh,
                                         const c10::optional<Tensor>& w_hr, bool reverse,
                                         bool train, bool xp_scratch) {
  constexpr const char* op = "fusedrnn::sequence_forward";
  const at::ScalarType dtype = float_dtype(op, xp);
  check_tensor(op, "xp", xp, dtype, {-1, -1});
  const Steps steps = make_steps(batch_sizes, xp.size(0));
  const Tensor bx = given(b_ih), bh = given(b_hh), wr = given(w_hr), cc0 = given(c0);
  std::vector<Tensor> out;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    constexpr int64_t G = Cell::kGates;
    TORCH_CHECK(xp.size(1) % G == 0 && xp.size(1) > 0, op, ": xp must be [rows, ", G,
                " * hidden] with hidden >= 1, got ", xp.sizes());
    const int64_t H = xp.size(1) / G, B = steps.size[0];
    const int64_t Hout = wr.defined() && wr.dim() == 2 ? wr.size(0) : H;
    if (wr.defined()) {
      TORCH_CHECK(Cell::kCellState, op, ": w_hr (proj_size) is only supported for LSTM");
      check_tensor(op, "w_hr", wr, dtype, {-1, H});
    }
    check_tensor(op, "h0", h0, dtype, {B, Hout});
    // float32 with a bf16 w_hh: a bfloat16 module (backend/cpu.py), whose step GEMMs take bf16
    // operands where oneDNN runs them, else the float32 GEMMs on the widened weight.
    const bool bf16_weights = dtype == at::kFloat && w_hh.scalar_type() == at::kBFloat16;
    check_tensor(op, "w_hh", w_hh, bf16_weights ? at::kBFloat16 : dtype, {G * H, Hout});
    const auto forced = forced_route();
    const Tensor w = bf16_weights && (Hout == 0 || !bf16_tiles_unavailable_reason().empty() ||
                                      forced == GemmRoute::kMkl)
                         ? w_hh.to(at::kFloat)
                         : w_hh;
    if (bx.defined()) check_tensor(op, "b_ih", bx, dtype, {G * H});
    if (bh.defined()) check_tensor(op, "b_hh", bh, dtype, {G * H});
    if constexpr (Cell::kCellState)
      check_tensor(op, "c0", cc0, dtype, {B, H});
    else
      check_absent(op, "c0", cc0, "for a cell without a cell state");
    auto or_zeros = [&](const Tensor& b) { return b.defined() ? b : at::zeros({G * H}, xp.options()); };
    AT_DISPATCH_FLOATING_TYPES(dtype, "fusedrnn_sequence_forward", [&] {
      using K = Kernel<Cell, scalar_t>;
      const Tensor bias_x = or_zeros(bx), bias_h = or_zeros(bh);
      const GemmRoute route = w.scalar_type() == at::kBFloat16
                                  ? GemmRoute::kOnednnTiles
                                  : K::choose_route(cell, xp, steps, h0, cc0, w, bias_x, bias_h,
                                                    wr, train);
      out = K::forward(xp, steps, h0, cc0, w, bias_x, bias_h, wr, reverse, train, route,
                       xp_scratch);
    });
  });
  return out;
}

}  // namespace

std::vector<Tensor> sequence_forward(const std::string& cell, const Tensor& xp,
                                     const Tensor& batch_sizes, const Tensor& h0,
                                     const c10::optional<Tensor>& c0, const Tensor& w_hh,
                                     const c10::optional<Tensor>& b_ih,
                                     const c10::optional<Tensor>& b_hh,
                                     const c10::optional<Tensor>& w_hr, bool reverse, bool train) {
  return run_sequence_forward(cell, xp, batch_sizes, h0, c0, w_hh, b_ih, b_hh, w_hr, reverse,
                              train, false);
}

namespace {

// The number of layers times directions of a stack, from its weights (five per layer and
// direction: w_ih, w_hh, b_ih, b_hh, w_hr).
int64_t stack_count(const char* op, int64_t weights, bool bidirectional) {
  const int64_t directions = bidirectional ? 2 : 1;
  TORCH_CHECK(weights > 0 && weights % (5 * directions) == 0, op,
              ": five weights (w_ih, w_hh, b_ih, b_hh, w_hr) per layer and direction, got ",
              weights, " for ", directions, " direction(s)");
  return weights / 5;
}

// The dropout masks between the layers: none, or one per layer but the last, of x's dtype.
void check_masks(const char* op, at::TensorList masks, int64_t layers, const Tensor& x) {
  if (masks.empty()) return;
  TORCH_CHECK(static_cast<int64_t>(masks.size()) == layers - 1, op,
              ": masks must be empty or one per layer but the last (", layers - 1, "), got ",
              masks.size());
  for (const Tensor& m : masks)
    TORCH_CHECK(m.scalar_type() == x.scalar_type() && m.device() == x.device() && m.dim() == 2,
                op, ": masks must be 2-D ", x.scalar_type(), " tensors on ", x.device(),
                ", got ", m.scalar_type(), " ", m.sizes(), " on ", m.device());
}

// The dropout mask after layer `layer`, checked against that layer's output (or its gradient).
const Tensor& mask_after(const char* op, at::TensorList masks, int64_t layer,
                         at::IntArrayRef output) {
  TORCH_CHECK(masks[layer].sizes() == output, op, ": masks[", layer, "] must be shaped as layer ",
              layer, "'s output ", output, ", got ", masks[layer].sizes());
  return masks[layer];
}

}  // namespace

std::vector<Tensor> stack_forward(const std::string& cell, const Tensor& x,
                                  const Tensor& batch_sizes, at::TensorList h0,
                                  const c10::List<c10::optional<Tensor>>& c0,
                                  const c10::List<c10::optional<Tensor>>& weights,
                                  bool bidirectional, bool train, at::TensorList masks) {
  const char* op = "fusedrnn::stack_forward";
  const int64_t directions = bidirectional ? 2 : 1;
  const int64_t count = stack_count(op, static_cast<int64_t>(weights.size()), bidirectional);
  TORCH_CHECK(static_cast<int64_t>(h0.size()) == count, op,
              ": one h0 per layer and direction, got ", h0.size(), " for ", count);
  TORCH_CHECK(static_cast<int64_t>(c0.size()) == count, op, ": one c0 (or None) per h0, got ",
              c0.size(), " for ", count);
  check_masks(op, masks, count / directions, x);
  // bfloat16 (inference): what backend/cpu.py's _forward does per layer, here for the whole
  // stack: bf16 projections, the kernels on float32 states and biases and the bf16 w_hh, each
  // layer's output rounded to bf16 before the next layer reads it.
  const bool low = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!(low && train), op, ": bfloat16 runs in inference only (train false); its "
              "training runs layer by layer");
  const auto widened = [&](const Tensor& t) { return low && t.defined() ? t.to(at::kFloat) : t; };
  const auto rounded = [&](const Tensor& t) { return low ? t.to(at::kBFloat16) : t; };
  auto weight = [&](int64_t k, int64_t i) { return given(weights.get(5 * k + i)); };
  Tensor input = x;
  std::vector<Tensor> h_n, c_n, saved, inputs;
  for (int64_t layer = 0; layer < count / directions; ++layer) {
    if (layer > 0 && !masks.empty())
      input = input.mul(mask_after(op, masks, layer - 1, input.sizes()));
    if (train && layer > 0) inputs.push_back(input);
    std::vector<Tensor> outputs;
    for (int64_t direction = 0; direction < directions; ++direction) {
      const int64_t k = layer * directions + direction;
      const Tensor w_ih = weight(k, 0);
      TORCH_CHECK(w_ih.defined(), op, ": w_ih of layer ", layer, " is required");
      const Tensor xp = mm_rows(input, w_ih.t());
      std::vector<Tensor> out = run_sequence_forward(
          cell, xp, batch_sizes, widened(h0[k]), widened(given(c0.get(k))), weight(k, 1),
          widened(weight(k, 2)), widened(weight(k, 3)), widened(weight(k, 4)), direction == 1,
          train, /*xp_scratch=*/true);
      outputs.push_back(rounded(out[0]));
      h_n.push_back(out[1]);
      c_n.push_back(out[2]);
      if (train) saved.insert(saved.end(), out.begin() + 3, out.end());
    }
    input = directions == 1 ? outputs[0] : at::cat(outputs, 1);
  }
  // (sequence_forward required c0 of a cell with c, and refused it for the others)
  std::vector<Tensor> result{input, rounded(at::stack(h_n)),
                             c0.get(0).has_value() ? rounded(at::stack(c_n))
                                                   : at::empty({0}, x.options())};
  result.insert(result.end(), saved.begin(), saved.end());
  result.insert(result.end(), inputs.begin(), inputs.end());
  return result;
}

std::vector<Tensor> stack_backward(const std::string& cell, const Tensor& batch_sizes,
                                   const Tensor& x, const c10::List<c10::optional<Tensor>>& weights,
                                   bool bidirectional, at::TensorList saved, const Tensor& grad_y,
                                   const Tensor& grad_hn, const c10::optional<Tensor>& grad_cn,
                                   bool need_dx, at::TensorList masks) {
  const char* op = "fusedrnn::stack_backward";
  const int64_t directions = bidirectional ? 2 : 1;
  const int64_t count = stack_count(op, static_cast<int64_t>(weights.size()), bidirectional);
  const int64_t layers = count / directions;
  check_masks(op, masks, layers, x);
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 4 * count + layers - 1, op,
              ": saved must be stack_forward's ", 4 * count + layers - 1,
              " saved tensors (train true), got ", saved.size());
  auto weight = [&](int64_t k, int64_t i) { return given(weights.get(5 * k + i)); };
  const Tensor gc = given(grad_cn);
  int64_t G = 1;
  bool has_c = false;
  with_cell(cell, [&](auto c) {
    G = decltype(c)::kGates;
    has_c = decltype(c)::kCellState;
  });
  if (has_c && gc.defined())
    TORCH_CHECK(gc.dim() == 3 && gc.size(0) == count, op, ": grad_cn must be [", count,
                ", batch, hidden], got ", gc.sizes());
  if (!has_c) check_absent(op, "grad_cn", gc, "for a cell without a cell state");
  for (int64_t k = 0; k < count; ++k)
    TORCH_CHECK(weight(k, 0).defined() && weight(k, 1).defined(), op,
                ": w_ih and w_hh of every layer and direction are required");
  TORCH_CHECK(grad_y.dim() == 2, op, ": grad_y must be [rows, directions * out], got ",
              grad_y.sizes());
  TORCH_CHECK(grad_hn.dim() == 3 && grad_hn.size(0) == count, op, ": grad_hn must be [",
              count, ", batch, out], got ", grad_hn.sizes());
  const int64_t B = grad_hn.size(1);
  const int64_t Hout = grad_y.size(1) / directions;
  // The layer's output gradient runs down the stack: each direction's backward gives d_xp,
  // whence the weight gradient d_w_ih and the input gradient (the directions' summed).
  std::vector<Tensor> dh0(count), dc0(count), grads(5 * count);
  Tensor grad = grad_y;
  for (int64_t layer = layers - 1; layer >= 0; --layer) {
    const Tensor& input = layer == 0 ? x : saved[4 * count + layer - 1];
    Tensor dx;
    for (int64_t direction = 0; direction < directions; ++direction) {
      const int64_t k = layer * directions + direction;
      const Tensor w_ih = weight(k, 0), w_hh = weight(k, 1), w_hr = weight(k, 4);
      const Tensor g = directions == 1 ? grad.contiguous()
                                       : grad.narrow(1, direction * Hout, Hout).contiguous();
      const Tensor dhn = grad_hn.select(0, k).contiguous();
      c10::optional<Tensor> dcn;
      if (has_c)
        dcn = gc.defined() ? gc.select(0, k).contiguous()
                           : at::zeros({B, w_hh.size(0) / G}, g.options());
      std::vector<Tensor> out = sequence_backward(
          cell, batch_sizes, w_hh, w_hr.defined() ? c10::optional<Tensor>(w_hr) : c10::nullopt,
          direction == 1, saved.slice(4 * k, 4), g, dhn, dcn);
      const Tensor& dxp = out[0];
      dh0[k] = out[1];
      dc0[k] = out[2];
      grads[5 * k] = mm_tn(dxp, input);
      grads[5 * k + 1] = out[3];
      grads[5 * k + 2] = weight(k, 2).defined() ? out[6] : at::empty({0}, g.options());
      grads[5 * k + 3] = weight(k, 3).defined() ? out[4] : at::empty({0}, g.options());
      grads[5 * k + 4] = out[5];
      if (layer > 0 || need_dx) {
        Tensor part = mm_rows(dxp, w_ih);
        dx = dx.defined() ? dx.add_(part) : part;
      }
    }
    if (layer > 0 && !masks.empty()) dx.mul_(mask_after(op, masks, layer - 1, dx.sizes()));
    grad = dx;
  }
  std::vector<Tensor> result{need_dx ? grad : at::empty({0}, x.options()), at::stack(dh0),
                             has_c ? at::stack(dc0) : at::empty({0}, x.options())};
  result.insert(result.end(), grads.begin(), grads.end());
  return result;
}

std::vector<Tensor> sequence_backward(const std::string& cell, const Tensor& batch_sizes,
                                      const Tensor& w_hh, const c10::optional<Tensor>& w_hr,
                                      bool reverse, at::TensorList saved, const Tensor& grad_y,
                                      const Tensor& grad_hn,
                                      const c10::optional<Tensor>& grad_cn) {
  constexpr const char* op = "fusedrnn::sequence_backward";
  TORCH_CHECK(saved.size() == 4, op, ": saved must be the forward's 4 saved tensors, got ",
              saved.size());
  const Tensor &act = saved[0], &h_prev = saved[1], &c_prev = saved[2], &proj_in = saved[3];
  TORCH_CHECK(act.defined(), op, ": saved[0] (activations) is required");
  const at::ScalarType dtype = float_dtype(op, act);
  // float32 with a bf16 w_hh: a bfloat16 module, as in sequence_forward.
  const bool bf16_weights = dtype == at::kFloat && w_hh.defined() &&
                            w_hh.scalar_type() == at::kBFloat16;
  check_tensor(op, "w_hh", w_hh, bf16_weights ? at::kBFloat16 : dtype, {-1, -1});
  check_tensor(op, "saved[0] (activations)", act, dtype, {-1, -1});
  const Tensor w = bf16_weights && (w_hh.size(1) == 0 ||
                                    !bf16_tiles_unavailable_reason().empty() ||
                                    forced_route() == GemmRoute::kMkl)
                       ? w_hh.to(at::kFloat)
                       : w_hh;
  const Steps steps = make_steps(batch_sizes, act.size(0));
  const Tensor wr = given(w_hr), gc = given(grad_cn);
  std::vector<Tensor> out;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    constexpr int64_t G = Cell::kGates;
    TORCH_CHECK(w_hh.size(0) % G == 0 && w_hh.size(0) > 0, op, ": w_hh must be [", G,
                " * hidden, out] with hidden >= 1, got ", w_hh.sizes());
    const int64_t H = w_hh.size(0) / G, Hout = w_hh.size(1);
    const int64_t rows = act.size(0), B = steps.size[0];
    check_tensor(op, "saved[0] (activations)", act, dtype, {rows, Cell::kSaved * H});
    check_tensor(op, "saved[1] (h_prev)", h_prev, dtype, {rows, Hout});
    check_tensor(op, "saved[2] (c_prev)", c_prev, dtype, {Cell::kCellState ? rows : 0, H});
    check_tensor(op, "saved[3] (proj_in)", proj_in, dtype, {wr.defined() ? rows : 0, H});
    check_tensor(op, "grad_y", grad_y, dtype, {rows, Hout});
    check_tensor(op, "grad_hn", grad_hn, dtype, {B, Hout});
    if (wr.defined()) {
      TORCH_CHECK(Cell::kCellState, op, ": w_hr (proj_size) is only supported for LSTM");
      check_tensor(op, "w_hr", wr, dtype, {Hout, H});
    } else {
      TORCH_CHECK(Hout == H, op, ": w_hh is [", G * H, ", ", Hout,
                  "]: its width must be the hidden size without w_hr");
    }
    if constexpr (Cell::kCellState)
      check_tensor(op, "grad_cn", gc, dtype, {B, H});
    else
      check_absent(op, "grad_cn", gc, "for a cell without a cell state");
    AT_DISPATCH_FLOATING_TYPES(dtype, "fusedrnn_sequence_backward", [&] {
      using K = Kernel<Cell, scalar_t>;
      const GemmRoute route =
          w.scalar_type() == at::kBFloat16
              ? GemmRoute::kOnednnTiles
              : K::choose_backward_route(cell, steps, w, wr, reverse, act, h_prev, c_prev,
                                         proj_in, grad_y, grad_hn, gc);
      out = K::backward(steps, w, wr, reverse, act, h_prev, c_prev, proj_in, grad_y, grad_hn, gc,
                        route);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fusedrnn
