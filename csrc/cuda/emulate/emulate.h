// An emulation of CUDA's execution model on CPU threads, so that csrc/cuda's kernels compile
// with g++ and run in tests on a machine without a GPU (like TRITON_INTERPRET=1 for Triton).
//
// What it implements, and nothing else (the kernels keep within it):
//   - one std::thread per CUDA thread; threadIdx, blockIdx, blockDim, gridDim as thread-locals
//   - __syncthreads(): a barrier over the block's threads
//   - grid_sync(): a barrier over every thread of the launch (cooperative launches)
//   - dynamic shared memory: one buffer per block, filled with NaN bytes (undefined on a GPU)
//   - __shfl_xor_sync over a full warp of 32 lanes (every lane must call it, as on a GPU)
//   - atomicAdd on float and double
// Threads of a warp are not run in lockstep: code that relies on implicit warp synchrony
// (no __syncwarp) is a bug on a GPU too, and here it shows up as a wrong result or a race.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace fusedrnn {
namespace emulate {

// The 16-bit storage types, laid out as torch's float16 and bfloat16 tensors are: _Float16 is
// IEEE binary16 (GCC converts with round-to-nearest-even); bfloat16 is the top half of a float,
// rounded to nearest even as CUDA's __float2bfloat16_rn does (NaN stays NaN).
using half = _Float16;
struct bfloat16 {
  uint16_t bits;
};

inline float to_float(bfloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bfloat16 to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}

constexpr int kWarpSize = 32;
// Threads one launch may start. Over it a launch is refused before any thread starts: a
// thread that failed to start midway would leave the started ones waiting at barriers.
constexpr unsigned kMaxThreads = 4096;

struct Warp {
  std::barrier<> barrier;
  uint64_t lanes[kWarpSize];
  explicit Warp(int size) : barrier(size) {}
};

struct Block {
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  // Dynamic shared memory, 8-byte aligned, filled with all-ones bytes (NaN in any float type):
  // a GPU leaves it undefined, so a kernel that reads it before writing must not pass here.
  std::vector<uint64_t> shared;
  Block(int threads, size_t shared_bytes)
      : barrier(threads), shared((shared_bytes + 7) / 8, ~uint64_t(0)) {
    for (int w = 0; w * kWarpSize < threads; ++w)
      warps.push_back(std::make_unique<Warp>(std::min(kWarpSize, threads - w * kWarpSize)));
  }
};

struct ThreadState {
  Block* block = nullptr;
  std::barrier<>* grid = nullptr;
};

inline thread_local ThreadState current;

}  // namespace emulate
}  // namespace fusedrnn

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() { fusedrnn::emulate::current.block->barrier.arrive_and_wait(); }

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  using namespace fusedrnn::emulate;
  const unsigned lane = threadIdx.x % kWarpSize;
  Warp& warp = *current.block->warps[threadIdx.x / kWarpSize];
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.lanes[lane] = bits;
  warp.barrier.arrive_and_wait();
  const uint64_t other = warp.lanes[lane ^ static_cast<unsigned>(lane_mask)];
  warp.barrier.arrive_and_wait();  // nobody overwrites a lane before every lane has read
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

template <typename T>
T atomicAdd(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (!ref.compare_exchange_weak(old, old + value)) {
  }
  return old;
}

namespace fusedrnn {
namespace emulate {

// The block's dynamic shared memory (`extern __shared__` on a GPU).
template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current.block->shared.data());
}

// FUSEDRNN_EMULATE_DROP_GRID_SYNC=1 makes the grid barrier a no-op: a deliberately broken
// kernel, with which tests prove that a missing barrier is caught (wrong results, or a race
// that ThreadSanitizer reports).
inline bool drop_grid_sync() {
  static const bool drop = [] {
    const char* v = std::getenv("FUSEDRNN_EMULATE_DROP_GRID_SYNC");
    return v && v[0] == '1';
  }();
  return drop;
}

inline void grid_sync() {
  if (!drop_grid_sync()) current.grid->arrive_and_wait();
}

// Runs kernel(args) on grid x block threads (1-D grids and blocks) and waits for all of them.
// Every thread of the launch is alive at once, so grid_sync() works for any grid.
template <typename Args>
void launch(void (*kernel)(Args), unsigned grid, unsigned block, size_t shared_bytes,
            const Args& args) {
  if (grid == 0 || block == 0) throw std::runtime_error("emulate::launch: empty grid or block");
  if (block > 1024) throw std::runtime_error("emulate::launch: over 1024 threads per block");
  if (static_cast<uint64_t>(grid) * block > kMaxThreads)
    throw std::runtime_error("emulate::launch: " + std::to_string(uint64_t(grid) * block) +
                             " threads, over the emulation's " + std::to_string(kMaxThreads));
  std::vector<std::unique_ptr<Block>> blocks;
  for (unsigned b = 0; b < grid; ++b)
    blocks.push_back(std::make_unique<Block>(static_cast<int>(block), shared_bytes));
  std::barrier<> grid_barrier(static_cast<std::ptrdiff_t>(grid) * block);
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(grid) * block);
  for (unsigned b = 0; b < grid; ++b)
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([&, b, t] {
        threadIdx = dim3(t);
        blockIdx = dim3(b);
        blockDim = dim3(block);
        gridDim = dim3(grid);
        current.block = blocks[b].get();
        current.grid = &grid_barrier;
        kernel(args);
      });
  for (std::thread& th : threads) th.join();
}

}  // namespace emulate
}  // namespace fusedrnn
