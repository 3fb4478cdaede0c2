#pragma once
// Autograd kernels (TORCH_LIBRARY_IMPL(cnnops, Autograd, m)), written the way torch's generated
// VariableType kernels are, not as torch::autograd::Function: torch.func (grad, jacrev, jvp,
// vmap of grad) and forward-mode AD refuse a C++ autograd Function, but accept a plain Node.
//
// Each forward kernel
//   1. runs the op below autograd (AutoDispatchBelowADInplaceOrView, then the CPU/CUDA kernel);
//   2. when an input requires grad, records a Node (make_node) whose apply() computes the
//      gradients by calling cnnops ops through the dispatcher (CNNOPS_OP_CALL, op_call.h). Under
//      create_graph=True those calls are recorded in turn, so every gradient is differentiable
//      again and none can silently lose a term;
//   3. when an input carries a forward-mode tangent, sets the output's tangent (the jvp formula),
//      computed from the primals (primal()) so nested forward levels stay apart.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>

#include "op_call.h"

#include <memory>
#include <optional>
#include <type_traits>

namespace cnnops::autograd {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// torch's Node is held by c10::intrusive_ptr in newer releases and by std::shared_ptr (with
// deleteNode, which frees long chains without deep recursion) in older ones (2.11); cnnops builds
// with both. Node::getptr() gives either kind, e.g. for SavedVariable::unpack of a saved output.
template <typename NodeT>
auto new_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, NodeT>) {
    return c10::make_intrusive<NodeT>();
  } else {
    return std::shared_ptr<NodeT>(new NodeT(), [](NodeT* node) { deleteNode(node); });
  }
}
// The Node recorded for `inputs` (in the order of its gradients), or null when none of them
// requires grad or grad mode is off. The caller saves what apply() needs, then set_history()s
// the differentiable outputs.
template <typename NodeT, typename... Inputs>
auto make_node(const Inputs&... inputs) {
  decltype(new_node<NodeT>()) node;
  if (!torch::autograd::compute_requires_grad(inputs...)) return node;
  node = new_node<NodeT>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// Forward-mode AD: the tangent of `t` at the current level (undefined when it has none), and
// the primal (a view of `t` without its tangent), from which jvp formulas are computed.
inline Tensor tangent(const Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : Tensor(); }
inline Tensor tangent(const std::optional<Tensor>& t) { return t.has_value() ? tangent(*t) : Tensor(); }
inline Tensor primal(const Tensor& t) { return t.defined() ? t._fw_primal(/*level=*/0) : t; }
inline void set_tangent(const Tensor& output, const Tensor& tangent) {
  if (tangent.defined()) output._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
}
// a + b where either may be undefined (a missing tangent or gradient term is zero).
inline Tensor add_defined(const Tensor& a, const Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a.add(b);
}

// Runs the forward below autograd: the op's CPU/CUDA kernel (plus ADInplaceOrView), once.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// The backward ops return an empty tensor for a gradient their output_mask left out.
inline Tensor undefined_unless(bool wanted, Tensor t) { return wanted ? std::move(t) : Tensor(); }

}  // namespace cnnops::autograd
