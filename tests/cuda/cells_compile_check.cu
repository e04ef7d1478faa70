// Compile-only check that csrc/cells/*.h build as CUDA device code (no GPU needed):
// one kernel per cell (every cell of csrc/cells/cells.h) and dtype runs forward and backward
// of one element.
#include "cells/cells.h"

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
#define FUSEDRNN_LAUNCH(NAME, TYPE)                                                            \
  cell_step<fusedrnn::cells::TYPE, T><<<1, 32>>>(nullptr, nullptr, nullptr, nullptr, 0, nullptr, \
                                                 nullptr, nullptr, nullptr);
  FUSEDRNN_FOR_EACH_CELL(FUSEDRNN_LAUNCH)
#undef FUSEDRNN_LAUNCH
}

template void instantiate<float>();
template void instantiate<double>();
