#include "cpu/buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

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

// Idle blocks are kept up to this many bytes (FUSEDRNN_CPU_CACHE_MB, a whole number >= 0,
// overrides the default 1024); a block freed beyond it goes back to the system.
size_t idle_limit() {
  static const size_t limit = [] {
    long long mb = 1024;
    if (const char* env = std::getenv("FUSEDRNN_CPU_CACHE_MB")) {
      char* end = nullptr;
      const long long value = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && value >= 0) mb = value;
    }
    return static_cast<size_t>(mb) << 20;
  }();
  return limit;
}

class BufferCache {
 public:
  // A block of at least `bytes` (a block_bytes() size).
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest idle block that fits, if it is at most a quarter larger than asked.
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first <= bytes + bytes / 4) {
        void* p = it->second;
        idle_bytes_ -= it->first;
        in_use_bytes_ += it->first;
        in_use_.emplace(p, it->first);
        idle_.erase(it);
        return p;
      }
    }
    const bool huge = bytes >= kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, huge ? kHugePage : 4096, bytes) != 0) throw std::bad_alloc();
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: fine if THP is off
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_bytes_ += bytes;
    in_use_.emplace(p, bytes);
    return p;
  }

  void give_back(void* p) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = in_use_.find(p);
      TORCH_INTERNAL_ASSERT(it != in_use_.end(), "fusedrnn: freeing a block the cache never gave");
      const size_t bytes = it->second;
      in_use_.erase(it);
      in_use_bytes_ -= bytes;
      if (idle_bytes_ + bytes <= idle_limit()) {
        // First among the idle blocks of its size, so that take() hands it out next: the
        // block last used is still in cache and TLB. (Inserted last, a layer called in a loop
        // cycled through every idle block of its sizes and ran ~20 % slower.)
        idle_.emplace_hint(idle_.lower_bound(bytes), bytes, p);
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

  // Held across fork() (pthread_atfork), so that a child, e.g. a DataLoader worker, never
  // inherits the lock or the maps mid-update from a thread that does not exist there.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;         // block size -> block
  std::unordered_map<void*, size_t> in_use_;  // block -> its size
  size_t idle_bytes_ = 0, in_use_bytes_ = 0;
};

// Never destroyed: tensors may still return blocks while the process exits.
BufferCache& cache() {
  static BufferCache* instance = [] {
    auto* created = new BufferCache();
    pthread_atfork([] { cache().lock(); }, [] { cache().unlock(); }, [] { cache().unlock(); });
    return created;
  }();
  return *instance;
}

// A CPU allocator over the cache, so that its tensors are ordinary CPU tensors (resizable,
// shareable, picklable); requests under kMinCachedBytes go to torch's default CPU allocator.
class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinCachedBytes) return c10::GetDefaultCPUAllocator()->allocate(bytes);
    void* p = cache().take(block_bytes(bytes));
    return {p, p, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void give_back(void* p) { cache().give_back(p); }
};

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty(sizes, options);
  static CachingAllocator* allocator = new CachingAllocator();  // storages keep a pointer to it
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

int64_t release_cached_buffers() { return cache().release(); }

std::vector<int64_t> cached_buffer_bytes() { return cache().bytes(); }

}  // namespace cpu
}  // namespace fusedrnn
