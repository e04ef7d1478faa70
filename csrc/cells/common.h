// Shared by every C++/CUDA kernel: the host/device qualifier and the scalar math the cells use.
//
// Math<T> is the only place the cells get exp/tanh/sigmoid from. float uses branch-free
// polynomial approximations (Cephes expf/tanhf, ~2 ulp) written with plain arithmetic so that
// GCC vectorizes the pointwise loops that inline them (libm's expf does not vectorize without
// -ffast-math); double uses libm, because double exists for gradcheck and 1e-10 tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDRNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDRNN_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace fusedrnn {
namespace cells {

FUSEDRNN_HOST_DEVICE float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

template <typename T>
struct Math;

template <>
struct Math<float> {
  FUSEDRNN_HOST_DEVICE static float exp(float x) {
    // exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2/2, computed on x clamped so that
    // 2^n is a normal float; past the ends the result is what expf gives: +inf above
    // ln(FLT_MAX), 0 below the normal range (expf's subnormals flushed), and NaN stays NaN.
    // Exact 0 and inf matter: sigmoid(-inf) must be 0, not 1e-38, for 0 * inf to give
    // torch.nn's NaN in the gradients.
    const float xc = x < -87.3f ? -87.3f : (x < 88.3f ? x : 88.3f);  // NaN -> 88.3: no NaN cast
    const float round_magic = 12582912.0f;  // 1.5 * 2^23: (v + m) - m rounds v to nearest
    float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float e = p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
    return x > 88.7228f ? bits_to_float(0x7f800000) : (x < -87.3f ? 0.0f : (x == x ? e : x));
  }
  FUSEDRNN_HOST_DEVICE static float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }
  FUSEDRNN_HOST_DEVICE static float tanh(float x) {
    // Small |x|: odd polynomial (no cancellation); else 1 - 2 / (exp(2x) + 1).
    float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    float small = p * z * x + x;
    float large = 1.0f - 2.0f / (exp(2.0f * x) + 1.0f);
    return z < 0.390625f ? small : large;  // |x| < 0.625
  }
  // NaN passes through, as in torch.relu.
  FUSEDRNN_HOST_DEVICE static float relu(float x) { return x < 0.0f ? 0.0f : x; }
};

template <>
struct Math<double> {
  FUSEDRNN_HOST_DEVICE static double exp(double x) { return ::exp(x); }
  FUSEDRNN_HOST_DEVICE static double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  FUSEDRNN_HOST_DEVICE static double tanh(double x) { return ::tanh(x); }
  FUSEDRNN_HOST_DEVICE static double relu(double x) { return x < 0.0 ? 0.0 : x; }
};

}  // namespace cells
}  // namespace fusedrnn
