// Checks of csrc/cuda/emulate/emulate.h on its own, and a persistent LSTM forward and backward
// to run under ThreadSanitizer. Built with g++ by tests/test_kernels_cuda.py (no torch).
//   emulation_checks barrier     block barrier ordering and grid barrier ordering
//   emulation_checks shuffle     a warp sum by __shfl_xor_sync, in several warps and blocks
//   emulation_checks persistent  one persistent forward and backward (LSTM and GRU), for TSan
// Prints "ok" and exits 0, or says what failed and exits 1.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/kernels.h"

namespace e = fusedrnn::emulate;
namespace k = fusedrnn::cuda;

struct BarrierArgs {
  int* out;      // [grid * block]
  int* flags;    // [grid]
  int* errors;
};

// Each thread writes its slot in shared memory, then (after __syncthreads) reads its
// neighbour's, which it can only see if the barrier ordered the write before the read. Then
// every block publishes a flag, and after the grid barrier every thread reads all flags.
void barrier_kernel(BarrierArgs a) {
  int* shared = k::dynamic_shared<int>();
  const int t = threadIdx.x, n = blockDim.x;
  for (int round = 1; round <= 20; ++round) {
    shared[t] = round * 1000 + t;
    __syncthreads();
    if (shared[(t + 1) % n] != round * 1000 + (t + 1) % n) atomicAdd(a.errors, 1);
    __syncthreads();
  }
  if (t == 0) a.flags[blockIdx.x] = int(blockIdx.x) + 1;
  k::grid_sync();
  for (unsigned b = 0; b < gridDim.x; ++b)
    if (a.flags[b] != int(b) + 1) atomicAdd(a.errors, 1);
  a.out[blockIdx.x * n + t] = 1;
}

struct ShuffleArgs {
  double* out;  // [grid * block]
};

void shuffle_kernel(ShuffleArgs a) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  a.out[g] = k::warp_sum(double(g));
}

int check_barrier() {
  const int grid = 3, block = 64;
  std::vector<int> out(grid * block, 0), flags(grid, 0);
  int errors = 0;
  e::launch(barrier_kernel, grid, block, block * sizeof(int),
            BarrierArgs{out.data(), flags.data(), &errors});
  for (int v : out) errors += v != 1;
  if (errors) std::printf("barrier: %d ordering errors\n", errors);
  return errors != 0;
}

int check_shuffle() {
  const int grid = 2, block = 96;
  std::vector<double> out(grid * block);
  e::launch(shuffle_kernel, grid, block, 0, ShuffleArgs{out.data()});
  int errors = 0;
  for (int g = 0; g < grid * block; ++g) {
    const int first = g / 32 * 32;
    const double want = 32.0 * first + 496.0;  // sum of first .. first + 31
    if (out[g] != want) ++errors;
  }
  if (errors) std::printf("shuffle: %d wrong warp sums\n", errors);
  return errors != 0;
}

// One persistent forward and backward on random inputs, 3 blocks of 32 threads.
template <typename Cell>
double run_persistent() {
  constexpr int G = Cell::kGates;
  const int64_t H = 9, B = 4, T = 5, U = 3, blocks = 3;
  std::mt19937 gen(1);
  std::normal_distribution<double> normal(0.0, 0.4);
  auto random = [&](size_t n) {
    std::vector<double> v(n);
    for (double& x : v) x = normal(gen);
    return v;
  };
  std::vector<int32_t> sizes = {4, 4, 3, 2, 1}, offsets = {0, 4, 8, 11, 13};
  const int64_t rows = 14;
  auto xp = random(rows * G * H), h0 = random(B * H), c0 = random(B * H);
  auto w = random(G * H * H), b = random(G * H), dy = random(rows * H), dhn = random(B * H),
       dcn = random(B * H);
  std::vector<double> y(rows * H), hg_all(rows * G * H), c_all(rows * H), hn(B * H), cn(B * H);
  std::vector<double> dxp(rows * G * H), dhg(rows * G * H), dh0(B * H), dc0(B * H);
  std::vector<double> scratch(std::max(k::persistent_forward_scratch<Cell>(H, B),
                                       k::persistent_backward_scratch<Cell>(H, B)));
  k::KernelArgs a{};
  a.hidden = H, a.batch = B, a.steps = T, a.units = U, a.save = 1;
  a.sizes = sizes.data(), a.offsets = offsets.data();
  a.xp = xp.data(), a.h0 = h0.data(), a.c0 = c0.data(), a.w_hh = w.data(), a.b_hh = b.data();
  a.y = y.data(), a.hg_all = hg_all.data(), a.c_all = c_all.data(), a.h_n = hn.data();
  a.c_n = cn.data(), a.scratch = scratch.data();
  e::launch(k::persistent_forward<Cell, double>, blocks, 32,
            k::persistent_forward_shared<Cell, double>(H, B, U), a);
  a.dy = dy.data(), a.dh_n = dhn.data(), a.dc_n = dcn.data(), a.dxp = dxp.data();
  a.dhg = dhg.data(), a.dh0 = dh0.data(), a.dc0 = dc0.data();
  e::launch(k::persistent_backward<Cell, double>, blocks, 32,
            k::persistent_backward_shared<Cell, double>(H, U), a);
  double sum = 0;
  for (double v : y) sum += v;
  for (double v : dh0) sum += v;
  return sum;
}

int main(int argc, char** argv) {
  const char* what = argc > 1 ? argv[1] : "";
  int failed = 1;
  if (!std::strcmp(what, "barrier")) failed = check_barrier();
  if (!std::strcmp(what, "shuffle")) failed = check_shuffle();
  if (!std::strcmp(what, "persistent")) {
    const double s = run_persistent<fusedrnn::cells::LSTM>() + run_persistent<fusedrnn::cells::GRU>();
    failed = !std::isfinite(s);
    std::printf("checksum %.17g\n", s);
  }
  std::printf(failed ? "failed\n" : "ok\n");
  return failed;
}
