// Sixteen floats in an AVX-512 register, and the cell math on them: the CPU forward runs each
// cell's own `forward` (csrc/cells/*.h) on F32x16 values, 16 hidden units at a time.
//
// Why not the auto-vectorized float loop: GCC vectorizes Math<float> (common.h), but its exp
// needs compares and blends for the range ends, ~200 vector operations per 16 LSTM units. Here
// exp scales by 2^n with vscalefps (which gives inf and 0 at the ends by itself) and its
// polynomial absorbs the argument's factor: the LSTM pass ran 1.5x faster (2.9 -> 1.9 ns per
// unit on an Intel Xeon, hidden 128, data in L2). Accuracy against float64 over [-100, 100]:
// sigmoid within 1.3 ulp and tanh within 2.2 (the float loop: 1.3 and 2.3); tests hold both to
// 4. A degree-5 exp with vrcp14ps reciprocals was 7 % faster but 2.3-2.6 ulp with a biased
// mean, and a float32 bias gradient (a sum over 512 rows) then missed 1e-5 in ~4 % of runs.
#pragma once

#if defined(__AVX512F__)
#define FUSEDRNN_VEC512 1
#include <immintrin.h>

#include "cells/common.h"

namespace fusedrnn {
namespace cells {

struct F32x16 {
  __m512 v;
  F32x16() = default;
  F32x16(float s) : v(_mm512_set1_ps(s)) {}  // NOLINT: the cells write T(1), T(0)
  explicit F32x16(__m512 x) : v(x) {}

  // Lanes [0, n) of p (n <= 16); the others read as 0.
  static __mmask16 lanes(int64_t n) {
    return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
  }
  static F32x16 load(const float* p, __mmask16 m) { return F32x16(_mm512_maskz_loadu_ps(m, p)); }
  void store(float* p, __mmask16 m) const { _mm512_mask_storeu_ps(p, m, v); }
};

inline F32x16 operator+(F32x16 a, F32x16 b) { return F32x16(_mm512_add_ps(a.v, b.v)); }
inline F32x16 operator-(F32x16 a, F32x16 b) { return F32x16(_mm512_sub_ps(a.v, b.v)); }
inline F32x16 operator*(F32x16 a, F32x16 b) { return F32x16(_mm512_mul_ps(a.v, b.v)); }

template <>
struct Math<F32x16> {
  static __m512 all(float x) { return _mm512_set1_ps(x); }

  // exp(k x), k in {-1, 2} (exact powers of two up to sign): n = round(k x / ln 2) and
  // s = x - n ln2 / k, so k x = n ln2 + k s; exp(k s) is a degree-6 polynomial in s whose
  // coefficients absorb k^i, and vscalefps multiplies by 2^n. x is clamped so that k x stays
  // in [-86.5, 89]: below, the result stays a normal float (no denormal slow paths), and it is
  // too small to change 1 + exp; above, 2^n overflows to inf, as exp does. NaN passes: max and
  // min return their second operand when either is NaN.
  template <int k>
  static __m512 exp_times(__m512 x) {
    constexpr float lo = k > 0 ? -86.5f / k : 89.0f / k, hi = k > 0 ? 89.0f / k : -86.5f / k;
    constexpr float K = static_cast<float>(k);
    const __m512 xc = _mm512_min_ps(all(hi), _mm512_max_ps(all(lo), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, all(K * 1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 s = _mm512_fnmadd_ps(n, all(0.693359375f / K), xc);  // ln 2 in two parts
    s = _mm512_fnmadd_ps(n, all(-2.12194440e-4f / K), s);
    // exp(r) on |r| <= ln2/2: a degree-6 least-squares minimax fit, relative error 1.7e-8
    __m512 p = all(1.383684576e-3f * K * K * K * K * K * K);
    p = _mm512_fmadd_ps(p, s, all(8.374815807e-3f * K * K * K * K * K));
    p = _mm512_fmadd_ps(p, s, all(4.166822508e-2f * K * K * K * K));
    p = _mm512_fmadd_ps(p, s, all(1.666641980e-1f * K * K * K));
    p = _mm512_fmadd_ps(p, s, all(4.999999106e-1f * K * K));
    p = _mm512_fmadd_ps(p, s, all(K));
    p = _mm512_fmadd_ps(p, s, all(1.0f));
    return _mm512_scalef_ps(p, n);
  }

  // 1 / d for d in [1, inf] (1 / inf = 0 exactly, as sigmoid(-inf) needs).
  static __m512 reciprocal(__m512 d) { return _mm512_div_ps(all(1.0f), d); }

  static F32x16 sigmoid(F32x16 x) {
    return F32x16(reciprocal(_mm512_add_ps(exp_times<-1>(x.v), all(1.0f))));
  }
  // |x| < 0.625: the odd polynomial of Math<float>::tanh (relative accuracy near 0); else
  // 1 - 2 / (exp(2x) + 1), which is exact only in absolute terms.
  static F32x16 tanh(F32x16 x) {
    const __m512 q = reciprocal(_mm512_add_ps(exp_times<2>(x.v), all(1.0f)));
    const __m512 large = _mm512_fnmadd_ps(all(2.0f), q, all(1.0f));
    const __m512 z = _mm512_mul_ps(x.v, x.v);
    __m512 p = _mm512_fmadd_ps(all(-5.70498872745e-3f), z, all(2.06390887954e-2f));
    p = _mm512_fmadd_ps(p, z, all(-5.37397155531e-2f));
    p = _mm512_fmadd_ps(p, z, all(1.33314422036e-1f));
    p = _mm512_fmadd_ps(p, z, all(-3.33332819422e-1f));
    const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x.v, x.v);
    const __mmask16 is_small = _mm512_cmp_ps_mask(z, all(0.390625f), _CMP_LT_OQ);
    return F32x16(_mm512_mask_blend_ps(is_small, large, small));
  }
  // NaN passes through, as in torch.relu (max returns its second operand for NaN).
  static F32x16 relu(F32x16 x) { return F32x16(_mm512_max_ps(_mm512_setzero_ps(), x.v)); }
};

}  // namespace cells
}  // namespace fusedrnn
#endif
