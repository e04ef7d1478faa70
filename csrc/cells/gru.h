// GRU cell, PyTorch's convention (gate order r, z, n; reset applied after the hidden GEMM:
// n = tanh(xn + r * (W_hn h + b_hn))): one element j of one row, forward and backward.
#pragma once
#include "common.h"

namespace fusedrnn {
namespace cells {

struct GRU {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // r, z, n and hn = W_hn h + b_hn, each H wide
  static constexpr bool kReadsH = true;
  static constexpr bool kCellState = false;
  static constexpr bool kSplitHiddenGrad = true;  // r scales hn, so d(hg_n) != d(xg_n)

  // Arguments as in LSTM::forward (xg, hg, bx, bh are [3H]).
  template <bool kSave = true, typename T>
  FUSEDRNN_HOST_DEVICE static T forward(const T* xg, const T* hg, const T* bx, const T* bh,
                                        int64_t H, int64_t j, T h_prev, T& /*c*/, T* save) {
    using M = Math<T>;
    const T r = M::sigmoid(xg[j] + bx[j] + hg[j] + bh[j]);
    const T z = M::sigmoid(xg[H + j] + bx[H + j] + hg[H + j] + bh[H + j]);
    const T hn = hg[2 * H + j] + bh[2 * H + j];
    const T n = M::tanh(xg[2 * H + j] + bx[2 * H + j] + r * hn);
    if (kSave) {
      save[j] = r;
      save[H + j] = z;
      save[2 * H + j] = n;
      save[3 * H + j] = hn;
    }
    return n + z * (h_prev - n);
  }

  // Writes d(xg) and d(hg) (they differ in the n gate); returns the direct dh_prev term z*dh.
  template <typename T>
  FUSEDRNN_HOST_DEVICE static T backward(const T* save, int64_t H, int64_t j, T h_prev,
                                         T /*c_prev*/, T dh, T& /*dc*/, T* dxg, T* dhg) {
    const T r = save[j], z = save[H + j], n = save[2 * H + j], hn = save[3 * H + j];
    const T dn = dh * (T(1) - z) * (T(1) - n * n);
    const T dr = dn * hn * r * (T(1) - r);
    const T dz = dh * (h_prev - n) * z * (T(1) - z);
    dxg[j] = dr;
    dxg[H + j] = dz;
    dxg[2 * H + j] = dn;
    dhg[j] = dr;
    dhg[H + j] = dz;
    dhg[2 * H + j] = dn * r;
    return dh * z;
  }
};

}  // namespace cells
}  // namespace fusedrnn
