// Compile-only check that csrc/cells/*.h build as CUDA device code (no GPU needed):
// one kernel per cell and dtype runs forward and backward of one element.
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"

template <typename Cell, typename T>
__global__ void cell_step(const T* xg, const T* hg, const T* bx, const T* bh, int64_t H, T* save,
                          T* out, T* dxg, T* dhg) {
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= H) return;
  T c = out[j];
  const T h = Cell::forward(xg, hg, bx, bh, H, j, out[H + j], c, save);
  T dc = T(1);
  out[j] = h + Cell::backward(save, H, j, out[H + j], c, h, dc, dxg, dhg) + dc;
}

template <typename T>
void instantiate() {
  cell_step<fusedrnn::cells::LSTM, T><<<1, 32>>>(nullptr, nullptr, nullptr, nullptr, 0, nullptr,
                                                 nullptr, nullptr, nullptr);
  cell_step<fusedrnn::cells::GRU, T><<<1, 32>>>(nullptr, nullptr, nullptr, nullptr, 0, nullptr,
                                                nullptr, nullptr, nullptr);
  cell_step<fusedrnn::cells::RNNTanh, T><<<1, 32>>>(nullptr, nullptr, nullptr, nullptr, 0,
                                                    nullptr, nullptr, nullptr, nullptr);
  cell_step<fusedrnn::cells::RNNRelu, T><<<1, 32>>>(nullptr, nullptr, nullptr, nullptr, 0,
                                                    nullptr, nullptr, nullptr, nullptr);
}

template void instantiate<float>();
template void instantiate<double>();
