// What the kernels use of the device, on a GPU (nvcc) or in the CPU emulation
// (emulate/emulate.h, g++ with FUSEDRNN_CUDA_EMULATE): thread indices, barriers, a warp sum,
// dynamic shared memory, and the loads and stores that convert storage types (fp16, bf16)
// to the fp32 the math runs in.
#pragma once

#include "cells/cells.h"

#if defined(FUSEDRNN_CUDA_EMULATE)
#include "cuda/emulate/emulate.h"
#else
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace fusedrnn {
namespace cuda {

#if defined(FUSEDRNN_CUDA_EMULATE)
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  return emulate::dynamic_shared<T>();
}
__device__ __forceinline__ void grid_sync() { emulate::grid_sync(); }
#else
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char shared_words[];  // aligned for any T
  return reinterpret_cast<T*>(shared_words);
}
// Needs a cooperative launch (every block resident), which the launchers make.
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }
#endif

constexpr int kWarpSize = 32;

// The sum over a warp's 32 lanes, in every lane. Every lane of the warp must call it.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Each value of v summed over the warp's 32 lanes, in every lane: the reductions are
// interleaved, so their shuffles overlap instead of waiting on each other.
template <int N, typename A>
__device__ __forceinline__ void warp_sum_all(A (&v)[N]) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], m);
  }
}

// The 16-bit storage types: CUDA's, or the emulation's of the same layout.
#if defined(FUSEDRNN_CUDA_EMULATE)
using half = emulate::half;
using bfloat16 = emulate::bfloat16;
inline float to_acc(half v) { return static_cast<float>(v); }
inline float to_acc(bfloat16 v) { return emulate::to_float(v); }
inline void store(half* p, float v) { *p = static_cast<half>(v); }
inline void store(bfloat16* p, float v) { *p = emulate::to_bfloat16(v); }
#else
using half = __half;
using bfloat16 = __nv_bfloat16;
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
#endif

// Storage type S -> the type A the math runs in, and back.
template <typename S>
struct Acc {
  using type = S;  // float and double compute in themselves
};
template <>
struct Acc<half> {
  using type = float;
};
template <>
struct Acc<bfloat16> {
  using type = float;
};
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// v rounded to storage S and back: h is stored in S every step, as torch.nn does.
template <typename S, typename A>
__device__ __forceinline__ A round_to(A v) {
  S s;
  store(&s, v);
  return to_acc(s);
}

}  // namespace cuda
}  // namespace fusedrnn
