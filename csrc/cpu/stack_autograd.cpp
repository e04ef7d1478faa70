// stack_train: a whole stack in training as one op with its autograd node in C++, so that a
// training step crosses Python once each way (torch.nn's LSTM does the same through
// _VF.lstm). A Python autograd.Function around stack_forward/stack_backward cost ~0.1 ms per
// step on a batch-1 LSTM of 100 units (about a fifth of its forward and backward).
//
// The backward calls stack_backward; where it must be differentiable (create_graph, grads
// batched by autograd or a torch.func transform) it calls stack_backward_reference instead,
// the vjp of the reference stack, defined in Python (fusedrnn/backend/cpu.py).
#include <algorithm>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include "cpu/sequence.h"

namespace fusedrnn {
namespace cpu {
namespace {

using at::Tensor;
using OptionalTensors = c10::List<c10::optional<Tensor>>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::optional<Tensor> optional(const Tensor& t) {
  return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt;
}

OptionalTensors optionals(at::TensorList tensors) {
  OptionalTensors list;
  for (const Tensor& t : tensors) list.push_back(optional(t));
  return list;
}

// Through the dispatcher (not the C++ functions): what autograd saves and runs stays traceable.
std::vector<Tensor> call_stack_forward(const std::string& cell, const Tensor& x,
                                       const Tensor& batch_sizes, at::TensorList h0,
                                       const OptionalTensors& c0, const OptionalTensors& weights,
                                       bool bidirectional, at::TensorList masks) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedrnn::stack_forward", "")
          .typed<std::vector<Tensor>(const std::string&, const Tensor&, const Tensor&,
                                     at::TensorList, const OptionalTensors&,
                                     const OptionalTensors&, bool, bool, at::TensorList)>();
  return op.call(cell, x, batch_sizes, h0, c0, weights, bidirectional, true, masks);
}

std::vector<Tensor> call_stack_backward(const std::string& cell, const Tensor& batch_sizes,
                                        const Tensor& x, const OptionalTensors& weights,
                                        bool bidirectional, at::TensorList saved,
                                        const Tensor& grad_y, const Tensor& grad_hn,
                                        const c10::optional<Tensor>& grad_cn, bool need_dx,
                                        at::TensorList masks) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedrnn::stack_backward", "")
          .typed<std::vector<Tensor>(const std::string&, const Tensor&, const Tensor&,
                                     const OptionalTensors&, bool, at::TensorList,
                                     const Tensor&, const Tensor&,
                                     const c10::optional<Tensor>&, bool, at::TensorList)>();
  return op.call(cell, batch_sizes, x, weights, bidirectional, saved, grad_y, grad_hn, grad_cn,
                 need_dx, masks);
}

std::vector<Tensor> call_stack_backward_reference(
    const std::string& cell, bool bidirectional, at::TensorList masks, const Tensor& x,
    const Tensor& batch_sizes, at::TensorList h0, const OptionalTensors& c0,
    const OptionalTensors& weights, const c10::optional<Tensor>& grad_y,
    const c10::optional<Tensor>& grad_hn, const c10::optional<Tensor>& grad_cn) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedrnn::stack_backward_reference", "")
          .typed<std::vector<Tensor>(const std::string&, bool, at::TensorList, const Tensor&,
                                     const Tensor&, at::TensorList, const OptionalTensors&,
                                     const OptionalTensors&, const c10::optional<Tensor>&,
                                     const c10::optional<Tensor>&,
                                     const c10::optional<Tensor>&)>();
  return op.call(cell, bidirectional, masks, x, batch_sizes, h0, c0, weights, grad_y, grad_hn,
                 grad_cn);
}

// The 7 * count slots h0s, c0s, weights (torch.nn's order; undefined: None) from the defined
// ones and which slots they fill (autograd takes defined tensors only as inputs).
std::vector<Tensor> fill_slots(at::TensorList present, const std::vector<int64_t>& has) {
  std::vector<Tensor> slots;
  size_t next = 0;
  for (const int64_t h : has) slots.push_back(h ? present[next++] : Tensor());
  return slots;
}

// apply's arguments: (cell, bidirectional, masks, has, x, batch_sizes, present): the first
// four are not variables; present one variable per defined slot (fill_slots).
struct StackFunction : public torch::autograd::Function<StackFunction> {
  // x's argument index, where its gradient goes, and its edge (variables only)
  static constexpr int64_t kX = 4, kXEdge = 0;

  static variable_list forward(AutogradContext* ctx, const std::string& cell,
                               bool bidirectional, const std::vector<Tensor>& masks,
                               const std::vector<int64_t>& has, const Tensor& x,
                               const Tensor& batch_sizes, at::TensorList present) {
    const std::vector<Tensor> slots = fill_slots(present, has);
    const int64_t count = static_cast<int64_t>(slots.size()) / 7;
    const at::TensorList states(slots);
    std::vector<Tensor> out = call_stack_forward(
        cell, x, batch_sizes, states.slice(0, count), optionals(states.slice(count, count)),
        optionals(states.slice(2 * count)), bidirectional, masks);
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["has"] = has;
    ctx->saved_data["masks"] = static_cast<int64_t>(masks.size());
    variable_list save{x, batch_sizes};
    save.insert(save.end(), present.begin(), present.end());
    save.insert(save.end(), masks.begin(), masks.end());
    save.insert(save.end(), out.begin() + 3, out.end());
    ctx->save_for_backward(save);
    ctx->set_materialize_grads(false);
    if (count == 0 || !slots[count].defined()) ctx->mark_non_differentiable({out[2]});
    return {out[0], out[1], out[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool bidirectional = ctx->saved_data["bidirectional"].toBool();
    const std::vector<int64_t> has = ctx->saved_data["has"].toIntVector();
    const int64_t n_masks = ctx->saved_data["masks"].toInt();
    const int64_t count = static_cast<int64_t>(has.size()) / 7;
    const int64_t n_present = std::count(has.begin(), has.end(), 1);
    const at::TensorList all(s);
    const Tensor &x = s[0], &batch_sizes = s[1];
    const std::vector<Tensor> slots = fill_slots(all.slice(2, n_present), has);
    const at::TensorList states(slots), h0 = states.slice(0, count),
        c0 = states.slice(count, count), weights = states.slice(2 * count),
        masks = all.slice(2 + n_present, n_masks), saved = all.slice(2 + n_present + n_masks);
    const bool has_c = c0[0].defined();
    const Tensor grad_y = grads[0], grad_hn = grads[1], grad_cn = has_c ? grads[2] : Tensor();

    // the slot gradients (undefined where none), then one result per apply argument
    std::vector<Tensor> slot_grads;
    Tensor dx;
    const c10::DispatchKeySet batched{c10::DispatchKey::Batched,
                                      c10::DispatchKey::FuncTorchBatched,
                                      c10::DispatchKey::FuncTorchGradWrapper};
    const bool differentiable =
        torch::autograd::GradMode::is_enabled() ||
        c10::impl::tls_is_dispatch_key_included(
            c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
        std::any_of(grads.begin(), grads.end(), [&](const Tensor& g) {
          return g.defined() && g.key_set().has_any(batched);
        });
    if (differentiable) {
      const std::vector<Tensor> g = call_stack_backward_reference(
          cell, bidirectional, masks, x, batch_sizes, h0, optionals(c0), optionals(weights),
          optional(grad_y), optional(grad_hn), optional(grad_cn));
      // g: one per x and slot; empty where there is no gradient
      const auto matching = [](const Tensor& grad, const Tensor& input) {
        return input.defined() && grad.sizes() == input.sizes() ? grad : Tensor();
      };
      dx = matching(g[0], x);
      for (int64_t i = 0; i < 7 * count; ++i) slot_grads.push_back(matching(g[1 + i], slots[i]));
    } else {
      const Tensor& h = h0[0];
      const Tensor gy = grad_y.defined()
                            ? grad_y.contiguous()
                            : at::zeros({x.size(0), (bidirectional ? 2 : 1) * h.size(1)},
                                        x.options());
      const Tensor ghn = grad_hn.defined()
                             ? grad_hn.contiguous()
                             : at::zeros({count, h.size(0), h.size(1)}, h.options());
      const bool need_dx = ctx->needs_input_grad(kXEdge);
      const std::vector<Tensor> g = call_stack_backward(
          cell, batch_sizes, x, optionals(weights), bidirectional, saved, gy, ghn,
          optional(grad_cn.defined() ? grad_cn.contiguous() : Tensor()), need_dx, masks);
      dx = need_dx ? g[0] : Tensor();
      for (int64_t k = 0; k < count; ++k) slot_grads.push_back(g[1][k]);
      for (int64_t k = 0; k < count; ++k) slot_grads.push_back(has_c ? g[2][k] : Tensor());
      slot_grads.insert(slot_grads.end(), g.begin() + 3, g.end());
    }
    variable_list result(kX, Tensor());  // cell, bidirectional, masks, has
    result.push_back(dx);
    result.push_back(Tensor());  // batch_sizes
    for (int64_t i = 0; i < 7 * count; ++i)
      if (has[i]) result.push_back(slot_grads[i]);
    return result;
  }
};

}  // namespace

std::vector<Tensor> stack_train(const std::string& cell, const Tensor& x,
                                const Tensor& batch_sizes, at::TensorList h0,
                                const OptionalTensors& c0, const OptionalTensors& weights,
                                bool bidirectional, at::TensorList masks) {
  std::vector<Tensor> present(h0.begin(), h0.end());
  std::vector<int64_t> has(h0.size(), 1);
  for (const auto* list : {&c0, &weights})
    for (size_t i = 0; i < list->size(); ++i) {
      const c10::optional<Tensor> t = list->get(i);
      has.push_back(t.has_value() && t->defined());
      if (has.back()) present.push_back(*t);
    }
  TORCH_CHECK(has.size() == 7 * h0.size(), "fusedrnn::stack_train: one c0 (or None) and five ",
              "weights per h0, got ", h0.size(), " h0, ", c0.size(), " c0 and ", weights.size(),
              " weights");
  return StackFunction::apply(cell, bidirectional, masks.vec(), has, x, batch_sizes,
                              at::TensorList(present));
}

std::vector<Tensor> stack_train_no_autograd(const std::string& cell, const Tensor& x,
                                            const Tensor& batch_sizes, at::TensorList h0,
                                            const OptionalTensors& c0,
                                            const OptionalTensors& weights, bool bidirectional,
                                            at::TensorList masks) {
  std::vector<Tensor> out =
      stack_forward(cell, x, batch_sizes, h0, c0, weights, bidirectional, false, masks);
  out.resize(3);
  return out;
}

}  // namespace cpu
}  // namespace fusedrnn
