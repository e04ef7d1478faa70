// The CPU sequence kernels: one layer, one direction, whole sequence per call.
#pragma once
#include <ATen/core/Tensor.h>
#include <string>
#include <vector>

namespace fusedrnn {
namespace cpu {

// xp = x W_ih^T, with b_ih (if any) not yet added: the pointwise pass adds it.
// Returns {y, h_n, c_n, saved...}; saved (act, h_prev, c_prev, proj_in) is what
// sequence_backward needs and is left empty unless `train`. c_n is empty for cells without c.
std::vector<at::Tensor> sequence_forward(const std::string& cell, const at::Tensor& xp,
                                         const at::Tensor& batch_sizes, const at::Tensor& h0,
                                         const c10::optional<at::Tensor>& c0,
                                         const at::Tensor& w_hh,
                                         const c10::optional<at::Tensor>& b_ih,
                                         const c10::optional<at::Tensor>& b_hh,
                                         const c10::optional<at::Tensor>& w_hr, bool reverse,
                                         bool train);

// Returns {d_xp, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr, d_b_ih} (d_c0/d_w_hr empty where not
// applicable).
std::vector<at::Tensor> sequence_backward(const std::string& cell, const at::Tensor& batch_sizes,
                                          const at::Tensor& w_hh,
                                          const c10::optional<at::Tensor>& w_hr, bool reverse,
                                          at::TensorList saved, const at::Tensor& grad_y,
                                          const at::Tensor& grad_hn,
                                          const c10::optional<at::Tensor>& grad_cn);

// A whole stack in one call: every layer (both directions when `bidirectional`) from the
// input rows x [rows, I], each direction as mm_rows and sequence_forward, the directions'
// outputs concatenated. h0 and c0 hold one state per layer and direction, in torch.nn's order,
// c0 None for cells without c; weights five per layer and direction: w_ih, w_hh, b_ih, b_hh,
// w_hr (None where absent); `masks` none, or one per layer but the last (dropout: each layer's
// output is multiplied by its mask before the next layer reads it). Returns {y [rows, D *
// Hout], h_n [L * D, B, Hout], c_n [L * D, B, H] (empty without c)}, and with `train` what
// stack_backward reads: each layer and direction's four saved tensors (sequence_forward's),
// then the (masked) input rows of layers 1..L-1.
std::vector<at::Tensor> stack_forward(const std::string& cell, const at::Tensor& x,
                                      const at::Tensor& batch_sizes, at::TensorList h0,
                                      const c10::List<c10::optional<at::Tensor>>& c0,
                                      const c10::List<c10::optional<at::Tensor>>& weights,
                                      bool bidirectional, bool train, at::TensorList masks);

// The whole stack's backward from stack_forward's saved tensors, layer by layer downwards:
// grad_y [rows, D * Hout] is the last layer's output gradient, grad_hn [L * D, B, Hout] and
// grad_cn [L * D, B, H] (None: zero) the final states'. Returns {d_x (empty unless need_dx),
// d_h0 [L * D, B, Hout], d_c0 (empty without c), then per layer and direction d_w_ih, d_w_hh,
// d_b_ih, d_b_hh, d_w_hr (empty where the weight is absent)}. `masks`: stack_forward's.
std::vector<at::Tensor> stack_backward(const std::string& cell, const at::Tensor& batch_sizes,
                                       const at::Tensor& x,
                                       const c10::List<c10::optional<at::Tensor>>& weights,
                                       bool bidirectional, at::TensorList saved,
                                       const at::Tensor& grad_y,
                                       const at::Tensor& grad_hn,
                                       const c10::optional<at::Tensor>& grad_cn, bool need_dx,
                                       at::TensorList masks);

// stack_forward and stack_backward as one op with its autograd node in C++
// (stack_autograd.cpp): y [rows, D * Hout], h_n, c_n (empty without c). Its kernel below
// autograd (inference mode) is stack_forward without the saves.
std::vector<at::Tensor> stack_train(const std::string& cell, const at::Tensor& x,
                                    const at::Tensor& batch_sizes, at::TensorList h0,
                                    const c10::List<c10::optional<at::Tensor>>& c0,
                                    const c10::List<c10::optional<at::Tensor>>& weights,
                                    bool bidirectional, at::TensorList masks);
std::vector<at::Tensor> stack_train_no_autograd(
    const std::string& cell, const at::Tensor& x, const at::Tensor& batch_sizes,
    at::TensorList h0, const c10::List<c10::optional<at::Tensor>>& c0,
    const c10::List<c10::optional<at::Tensor>>& weights, bool bidirectional,
    at::TensorList masks);

// The cells the kernels were built for (csrc/cells/cells.h), and one cell's traits as
// {gates, states, reads h_prev, split hidden grad, saved per hidden unit}: the Python registry
// (fusedrnn/cells.py) is checked against them.
std::vector<std::string> cell_names();
std::vector<int64_t> cell_traits(const std::string& cell);

// The forward GEMM routes chosen so far by measurement (FUSEDRNN_CPU_GEMM unset or "auto"), one
// line per layer shape: the winner and each measured route's time per step.
std::vector<std::string> gemm_routes();
// Why the onednn GEMM route cannot run on this machine and torch ("" when it can).
std::string onednn_route_reason();
// Why the tiles cannot run a bfloat16 module's GEMMs in bf16 here ("" when they can).
std::string bf16_route_reason();
// Why the forward's own AVX-512 step GEMM (the avx512 route) cannot run here ("" when it can).
std::string avx512_route_reason();
// How the float32 forward's pointwise pass runs: "avx512" (csrc/cpu/vec512.h) or
// "compiler-vectorized" (a build without AVX-512, or FUSEDRNN_CPU_AVX512=0).
std::string pointwise_isa();

// The whole-sequence GEMMs: a @ b (input projection, dx) split over rows by hand across the
// intra-op threads (bf16 operands give a float32 result); a^T @ b (weight gradients) as one
// MKL GEMM in its faster operand order.
at::Tensor mm_rows(const at::Tensor& a, const at::Tensor& b);
at::Tensor mm_tn(const at::Tensor& a, const at::Tensor& b);

}  // namespace cpu
}  // namespace fusedrnn
