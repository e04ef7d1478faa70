// The C entry points of the CUDA kernels (kernels.h), loaded by fusedrnn/backend/cuda.py
// through ctypes. Built two ways from this one file (fusedrnn/backend/cuda_build.py):
//   nvcc:  a shared library of GPU kernels for sm_80 and sm_90 (raw pointers, a stream);
//   g++ -DFUSEDRNN_CUDA_EMULATE -x c++: the same kernels run by emulate/emulate.h on CPU
//   threads, for tests on machines without a GPU (FUSEDRNN_CUDA_EMULATE=1).
// No torch here: the library needs only the CUDA runtime (linked statically) or nothing.
// Every function returns 0 on success, else writes a message to `error` and returns 1.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "cuda/kernels.h"

using fusedrnn::cuda::KernelArgs;
namespace cells = fusedrnn::cells;
namespace k = fusedrnn::cuda;

namespace {

enum Kernel { kPointwiseForward = 0, kPointwiseBackward, kPersistentForward, kPersistentBackward };
enum Dtype { kFloat32 = 0, kFloat64, kFloat16, kBFloat16 };

int fail(char* error, int size, const std::string& message) {
  if (error && size > 0) std::snprintf(error, size, "%s", message.c_str());
  return 1;
}

template <typename F>
bool with_cell(const char* cell, F&& f) {
#define FUSEDRNN_CELL_CASE(NAME, TYPE) \
  if (std::strcmp(cell, NAME) == 0) return f(cells::TYPE{}), true;
  FUSEDRNN_FOR_EACH_CELL(FUSEDRNN_CELL_CASE)
#undef FUSEDRNN_CELL_CASE
  return false;
}

// Calls f with a value of the storage type `dtype` names; false for an unknown code.
template <typename F>
bool with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{}), true;
    case kFloat64: return f(double{}), true;
    case kFloat16: return f(k::half{}), true;
    case kBFloat16: return f(k::bfloat16{}), true;
    default: return false;
  }
}

using KernelFn = void (*)(KernelArgs);

template <typename Cell, typename S>
KernelFn kernel_of(int kernel) {
  switch (kernel) {
    case kPointwiseForward: return k::pointwise_forward<Cell, S>;
    case kPointwiseBackward: return k::pointwise_backward<Cell, S>;
    case kPersistentForward: return k::persistent_forward<Cell, S>;
    case kPersistentBackward: return k::persistent_backward<Cell, S>;
    default: return nullptr;
  }
}

// Resolves (kernel, cell, dtype) to the instantiation, or says why there is none.
struct Resolved {
  KernelFn fn = nullptr;
  size_t shared = 0;     // persistent: dynamic shared bytes
  int64_t scratch = 0;   // persistent: scratch elements (A-typed)
  int acc_size = 0;      // bytes of A
};

Resolved resolve(int kernel, const char* cell, int dtype, int64_t hidden, int64_t batch,
                 int64_t units, std::string* why) {
  Resolved out;
  const bool cell_known = with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    const bool dtype_known = with_dtype(dtype, [&](auto s) {
      using S = decltype(s);
      using A = typename k::Acc<S>::type;
      out.fn = kernel_of<Cell, S>(kernel);
      out.acc_size = sizeof(A);
      if (kernel == kPersistentForward) {
        out.shared = k::persistent_forward_shared<Cell, S>(hidden, batch, units);
        out.scratch = k::persistent_forward_scratch<Cell>(hidden, batch);
      } else if (kernel == kPersistentBackward) {
        out.shared = k::persistent_backward_shared<Cell, S>(hidden, units);
        out.scratch = k::persistent_backward_scratch<Cell>(hidden, batch);
      }
    });
    if (!dtype_known) *why = "this build has no kernels for dtype code " + std::to_string(dtype);
  });
  if (!cell_known) *why = std::string("no cell '") + cell + "' (csrc/cells/cells.h)";
  if (cell_known && out.fn == nullptr && why->empty())
    *why = "unknown kernel code " + std::to_string(kernel);
  return out;
}

bool cooperative(int kernel) {
  return kernel == kPersistentForward || kernel == kPersistentBackward;
}

#if !defined(FUSEDRNN_CUDA_EMULATE)
std::string cuda_error(cudaError_t e, const char* what) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}
#endif

}  // namespace

extern "C" {

// "emulated" (CPU threads) or "cuda".
const char* fusedrnn_cuda_mode() {
#if defined(FUSEDRNN_CUDA_EMULATE)
  return "emulated";
#else
  return "cuda";
#endif
}

// The cells this build has, comma-separated, and one cell's traits as
// {gates, states, reads h, split hidden grad, saved per unit}.
const char* fusedrnn_cuda_cell_names() {
#define FUSEDRNN_CELL_NAME(NAME, TYPE) NAME ","
  static const char names[] = FUSEDRNN_FOR_EACH_CELL(FUSEDRNN_CELL_NAME);
#undef FUSEDRNN_CELL_NAME
  return names;
}

int fusedrnn_cuda_cell_traits(const char* cell, int64_t* traits, char* error, int size) {
  const bool known = with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    const int64_t v[5] = {Cell::kGates, Cell::kCellState ? 2 : 1, Cell::kReadsH,
                          Cell::kSplitHiddenGrad, Cell::kSaved};
    std::memcpy(traits, v, sizeof v);
  });
  return known ? 0 : fail(error, size, std::string("no cell '") + cell + "'");
}

// A persistent kernel's dynamic shared bytes and scratch elements for these sizes.
int fusedrnn_cuda_persistent_sizes(int kernel, const char* cell, int dtype, int64_t hidden,
                                   int64_t batch, int64_t units, int64_t* shared,
                                   int64_t* scratch, char* error, int size) {
  std::string why;
  const Resolved r = resolve(kernel, cell, dtype, hidden, batch, units, &why);
  if (!r.fn) return fail(error, size, why);
  *shared = static_cast<int64_t>(r.shared);
  *scratch = r.scratch;
  return 0;
}

// How many blocks of `threads` threads and `shared` bytes can be resident at once on the
// current device: the occupancy API times the SM count (emulated: FUSEDRNN_CUDA_EMULATE_SMS
// "SMs" of one block each, default 4, within the emulation's thread cap), and the device's
// shared-memory limit per block.
int fusedrnn_cuda_resident_blocks(int kernel, const char* cell, int dtype, int device,
                                  int threads, int64_t shared, int64_t* blocks,
                                  int64_t* shared_limit, char* error, int size) {
  std::string why;
  const Resolved r = resolve(kernel, cell, dtype, 1, 1, 1, &why);
  if (!r.fn) return fail(error, size, why);
#if defined(FUSEDRNN_CUDA_EMULATE)
  const char* sms = std::getenv("FUSEDRNN_CUDA_EMULATE_SMS");
  const int64_t cap = threads > 0 ? fusedrnn::emulate::kMaxThreads / threads : 1;
  *blocks = std::min<int64_t>(sms ? std::max(1, std::atoi(sms)) : 4, std::max<int64_t>(cap, 1));
  *shared_limit = 227 * 1024;
  (void)device;
  (void)threads;
  (void)shared;
#else
  int sm_count = 0, optin = 0, per_sm = 0;
  cudaError_t e = cudaSetDevice(device);  // this library's runtime has its own current device
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  *shared_limit = optin;
  if (e == cudaSuccess && shared > optin) {
    *blocks = 0;
    return 0;
  }
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(reinterpret_cast<const void*>(r.fn),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, r.fn, threads,
                                                      static_cast<size_t>(shared));
  if (e != cudaSuccess) return fail(error, size, cuda_error(e, "occupancy query"));
  *blocks = static_cast<int64_t>(per_sm) * sm_count;
#endif
  return 0;
}

// Launches one kernel on `stream` of `device` (persistent ones cooperatively) with `grid` x
// `block` threads and `shared` dynamic shared bytes. Emulated, it runs to completion before
// returning.
int fusedrnn_cuda_launch(int kernel, const char* cell, int dtype, const KernelArgs* args,
                         int device, int grid, int block, int64_t shared, void* stream,
                         char* error, int size) {
  std::string why;
  const Resolved r = resolve(kernel, cell, dtype, 1, 1, 1, &why);
  if (!r.fn) return fail(error, size, why);
  if (grid <= 0 || block <= 0 || block % k::kWarpSize != 0 || block > 1024)
    return fail(error, size, "bad launch shape: grid " + std::to_string(grid) + ", block " +
                                 std::to_string(block) + " (a multiple of 32, at most 1024)");
#if defined(FUSEDRNN_CUDA_EMULATE)
  (void)stream;
  (void)device;
  try {
    fusedrnn::emulate::launch(r.fn, static_cast<unsigned>(grid), static_cast<unsigned>(block),
                              static_cast<size_t>(shared), *args);
  } catch (const std::exception& e) {
    return fail(error, size, std::string("emulated launch failed: ") + e.what());
  }
#else
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess && cooperative(kernel)) {
    e = cudaFuncSetAttribute(reinterpret_cast<const void*>(r.fn),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    void* params[] = {const_cast<KernelArgs*>(args)};
    if (e == cudaSuccess)
      e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(r.fn), dim3(grid), dim3(block),
                                      params, static_cast<size_t>(shared), s);
  } else if (e == cudaSuccess) {
    r.fn<<<grid, block, static_cast<size_t>(shared), s>>>(*args);
    e = cudaGetLastError();
  }
  if (e != cudaSuccess) return fail(error, size, cuda_error(e, "kernel launch"));
#endif
  return 0;
}

}  // extern "C"
