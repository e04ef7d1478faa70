// LSTM cell (PyTorch gate order i, f, g, o): one element j of one row, forward and backward.
// proj_size is not part of the cell: the sequence loop multiplies h by W_hr afterwards.
#pragma once
#include "common.h"

namespace fusedrnn {
namespace cells {

struct LSTM {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 5;  // i, f, g, o (activated) and tanh(c), each H wide
  static constexpr bool kReadsH = false;
  static constexpr bool kCellState = true;
  static constexpr bool kSplitHiddenGrad = false;  // d(hg) == d(xg)

  // xg = x W_ih^T and hg = h W_hh^T: the row's [4H] GEMM outputs; bx, bh: b_ih, b_hh [4H].
  // c: c_prev in, c_new out; writes the kSaved values for backward (if kSave); returns h.
  template <bool kSave = true, typename T>
  FUSEDRNN_HOST_DEVICE static T forward(const T* xg, const T* hg, const T* bx, const T* bh,
                                        int64_t H, int64_t j, T /*h_prev*/, T& c, T* save) {
    using M = Math<T>;
    const T i = M::sigmoid(xg[j] + bx[j] + hg[j] + bh[j]);
    const T f = M::sigmoid(xg[H + j] + bx[H + j] + hg[H + j] + bh[H + j]);
    const T g = M::tanh(xg[2 * H + j] + bx[2 * H + j] + hg[2 * H + j] + bh[2 * H + j]);
    const T o = M::sigmoid(xg[3 * H + j] + bx[3 * H + j] + hg[3 * H + j] + bh[3 * H + j]);
    c = f * c + i * g;
    const T tc = M::tanh(c);
    if (kSave) {
      save[j] = i;
      save[H + j] = f;
      save[2 * H + j] = g;
      save[3 * H + j] = o;
      save[4 * H + j] = tc;
    }
    return o * tc;
  }

  // dh: gradient of this step's h; dc: gradient of c_new in, of c_prev out.
  // Writes the pre-activation gradients dxg (== dhg); returns the direct dh_prev term (none).
  template <typename T>
  FUSEDRNN_HOST_DEVICE static T backward(const T* save, int64_t H, int64_t j, T /*h_prev*/,
                                         T c_prev, T dh, T& dc, T* dxg, T* /*dhg*/) {
    const T i = save[j], f = save[H + j], g = save[2 * H + j], o = save[3 * H + j];
    const T tc = save[4 * H + j];
    const T dct = dc + dh * o * (T(1) - tc * tc);
    dxg[j] = dct * g * i * (T(1) - i);
    dxg[H + j] = dct * c_prev * f * (T(1) - f);
    dxg[2 * H + j] = dct * i * (T(1) - g * g);
    dxg[3 * H + j] = dh * tc * o * (T(1) - o);
    dc = dct * f;
    return T(0);
  }
};

}  // namespace cells
}  // namespace fusedrnn
