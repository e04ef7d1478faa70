// Registers fusedrnn's CPU ops with torch.library; importing fusedrnn._C loads them.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

namespace fusedrnn {
// Placeholder so the build is exercised end to end; the sequence kernels replace it.
int64_t abi_version() { return 1; }
}  // namespace fusedrnn

TORCH_LIBRARY(fusedrnn, m) { m.def("abi_version() -> int", &fusedrnn::abi_version); }

// A bare Python module: `import fusedrnn._C` runs the static registration above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
