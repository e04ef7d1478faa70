// Elman RNN cells, h = tanh(pre) or relu(pre): one element j of one row, forward and backward.
#pragma once
#include "common.h"

namespace fusedrnn {
namespace cells {

template <bool kRelu>
struct RNN {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;  // h
  static constexpr bool kReadsH = false;
  static constexpr bool kCellState = false;
  static constexpr bool kSplitHiddenGrad = false;

  // Arguments as in LSTM::forward (xg, hg, bx, bh are [H]).
  template <bool kSave = true, typename T>
  FUSEDRNN_HOST_DEVICE static T forward(const T* xg, const T* hg, const T* bx, const T* bh,
                                        int64_t /*H*/, int64_t j, T /*h_prev*/, T& /*c*/,
                                        T* save) {
    const T pre = xg[j] + bx[j] + hg[j] + bh[j];
    const T h = kRelu ? Math<T>::relu(pre) : Math<T>::tanh(pre);
    if (kSave) {
      save[j] = h;
    }
    return h;
  }

  template <typename T>
  FUSEDRNN_HOST_DEVICE static T backward(const T* save, int64_t /*H*/, int64_t j, T /*h_prev*/,
                                         T /*c_prev*/, T dh, T& /*dc*/, T* dxg, T* /*dhg*/) {
    const T h = save[j];
    // relu: torch's threshold_backward (h <= 0 ? 0 : dh), so a NaN h passes dh on
    dxg[j] = kRelu ? (h <= T(0) ? T(0) : dh) : dh * (T(1) - h * h);
    return T(0);
  }
};

using RNNTanh = RNN<false>;
using RNNRelu = RNN<true>;

}  // namespace cells
}  // namespace fusedrnn
