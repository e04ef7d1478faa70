// Registers fusedrnn's CPU ops with torch.library; importing fusedrnn._C loads them.
#include <Python.h>
#include <torch/library.h>

#include "cpu/buffer_cache.h"
#include "cpu/sequence.h"

TORCH_LIBRARY(fusedrnn, m) {
  m.def("sequence_forward(str cell, Tensor xp, Tensor batch_sizes, Tensor h0, Tensor? c0, "
        "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, bool train) "
        "-> Tensor[]");
  m.def("sequence_backward(str cell, Tensor batch_sizes, Tensor w_hh, Tensor? w_hr, "
        "bool reverse, Tensor[] saved, Tensor grad_y, Tensor grad_hn, Tensor? grad_cn) "
        "-> Tensor[]");
  m.def("stack_forward(str cell, Tensor x, Tensor batch_sizes, Tensor[] h0, Tensor?[] c0, "
        "Tensor?[] weights, bool bidirectional, bool train, Tensor[] masks) -> Tensor[]");
  m.def("stack_backward(str cell, Tensor batch_sizes, Tensor x, Tensor?[] weights, "
        "bool bidirectional, Tensor[] saved, Tensor grad_y, Tensor grad_hn, Tensor? grad_cn, "
        "bool need_dx, Tensor[] masks) -> Tensor[]");
  m.def("stack_train(str cell, Tensor x, Tensor batch_sizes, Tensor[] h0, Tensor?[] c0, "
        "Tensor?[] weights, bool bidirectional, Tensor[] masks) -> Tensor[]");
  // stack_train's differentiable backward: defined in Python (fusedrnn/backend/cpu.py)
  m.def("stack_backward_reference(str cell, bool bidirectional, Tensor[] masks, Tensor x, "
        "Tensor batch_sizes, Tensor[] h0, Tensor?[] c0, Tensor?[] weights, Tensor? grad_y, "
        "Tensor? grad_hn, Tensor? grad_cn) -> Tensor[]");
  m.def("mm_rows(Tensor a, Tensor b) -> Tensor");
  m.def("mm_tn(Tensor a, Tensor b) -> Tensor");
  m.def("release_cached_buffers() -> int", &fusedrnn::cpu::release_cached_buffers);
  m.def("cell_names() -> str[]", &fusedrnn::cpu::cell_names);
  m.def("cell_traits(str cell) -> int[]", &fusedrnn::cpu::cell_traits);
  m.def("cached_buffer_bytes() -> int[]", &fusedrnn::cpu::cached_buffer_bytes);
  m.def("gemm_routes() -> str[]", &fusedrnn::cpu::gemm_routes);
  m.def("onednn_route_reason() -> str", &fusedrnn::cpu::onednn_route_reason);
  m.def("bf16_route_reason() -> str", &fusedrnn::cpu::bf16_route_reason);
  m.def("avx512_route_reason() -> str", &fusedrnn::cpu::avx512_route_reason);
  m.def("pointwise_isa() -> str", &fusedrnn::cpu::pointwise_isa);
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("sequence_forward", &fusedrnn::cpu::sequence_forward);
  m.impl("sequence_backward", &fusedrnn::cpu::sequence_backward);
  m.impl("stack_forward", &fusedrnn::cpu::stack_forward);
  m.impl("stack_backward", &fusedrnn::cpu::stack_backward);
  m.impl("stack_train", &fusedrnn::cpu::stack_train_no_autograd);
  m.impl("mm_rows", &fusedrnn::cpu::mm_rows);
  m.impl("mm_tn", &fusedrnn::cpu::mm_tn);
}

TORCH_LIBRARY_IMPL(fusedrnn, Autograd, m) { m.impl("stack_train", &fusedrnn::cpu::stack_train); }

// A bare Python module: `import fusedrnn._C` runs the static registration above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
