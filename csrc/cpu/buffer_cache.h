// Large CPU buffers from a process-wide cache instead of malloc.
//
// glibc serves buffers of several MiB with mmap and unmaps them on free, so every layer call
// used to fault its outputs, saved activations and gradients in afresh, one 4 KiB page at a
// time: ~30 K faults per LSTM adder200 training step, at ~2.5 us each on the project VM.
// Cached blocks are reused across calls and are backed by transparent huge pages where the
// kernel allows it (madvise), which also shortens the first touch and the GEMMs' TLB walks.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fusedrnn {
namespace cpu {

// at::empty on the cache's allocator: an ordinary contiguous CPU tensor (resizable, picklable,
// shareable) whose storage returns to the cache when its last user drops it. Requests under
// 128 KiB go to torch's default CPU allocator.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached block no tensor is using; returns the bytes released.
int64_t release_cached_buffers();

// Bytes held by the cache: {in use by tensors, idle and reusable}.
std::vector<int64_t> cached_buffer_bytes();

}  // namespace cpu
}  // namespace fusedrnn
