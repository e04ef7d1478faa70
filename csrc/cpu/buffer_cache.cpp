#include "cpu/buffer_cache.h"

#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace fusedrnn {
namespace cpu {
namespace {

// glibc's initial mmap threshold: smaller buffers come from its heap without faults.
constexpr size_t kMinCachedBytes = size_t(128) << 10;
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallGranule = size_t(64) << 10;

// Blocks come in few sizes, so that calls whose row counts differ a little share them.
size_t block_bytes(size_t bytes) {
  const size_t granule = bytes < kHugePage ? kSmallGranule : kHugePage;
  return (bytes + granule - 1) / granule * granule;
}

// Idle blocks are kept up to this many bytes (FUSEDRNN_CPU_CACHE_MB overrides); a block freed
// beyond it goes back to the system.
size_t idle_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("FUSEDRNN_CPU_CACHE_MB");
    return (env ? std::strtoull(env, nullptr, 10) : 2048ull) << 20;
  }();
  return limit;
}

class BufferCache {
 public:
  // A block of at least `bytes` (a block_bytes() size); `bytes` becomes the block's size.
  void* take(size_t& bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest idle block that fits, unless it would waste more than half of itself.
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first <= 2 * bytes) {
        void* p = it->second;
        bytes = it->first;
        idle_bytes_ -= it->first;
        in_use_bytes_ += it->first;
        idle_.erase(it);
        return p;
      }
      in_use_bytes_ += bytes;
    }
    const bool huge = bytes >= kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, huge ? kHugePage : 4096, bytes) != 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ -= bytes;
      throw std::bad_alloc();
    }
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: fine if THP is off
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ -= bytes;
      if (idle_bytes_ + bytes <= idle_limit()) {
        idle_.emplace(bytes, p);
        idle_bytes_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  int64_t release() {
    std::multimap<size_t, void*> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t released = 0;
    for (auto& block : idle) {
      std::free(block.second);
      released += static_cast<int64_t>(block.first);
    }
    return released;
  }

  std::vector<int64_t> bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(in_use_bytes_), static_cast<int64_t>(idle_bytes_)};
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;  // block size -> block
  size_t idle_bytes_ = 0, in_use_bytes_ = 0;
};

// Never destroyed: tensors may still return blocks while the process exits.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinCachedBytes || !options.device().is_cpu()) return at::empty(sizes, options);
  size_t block = block_bytes(bytes);
  void* p = cache().take(block);
  return at::from_blob(
      p, sizes, [block](void* q) { cache().give_back(q, block); }, options);
}

int64_t release_cached_buffers() { return cache().release(); }

std::vector<int64_t> cached_buffer_bytes() { return cache().bytes(); }

}  // namespace cpu
}  // namespace fusedrnn
