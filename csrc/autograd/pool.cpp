// Autograd kernels of the pooling ops (see autograd.h for the pattern), forward and backward ops
// alike, so a pool differentiates to any order and has forward-mode tangents. The derivatives
// are torch's (derivatives.yaml):
//   max pools:      y = gather(x, idx)          dx = scatter_add(dy, idx)    (max_pool_backward)
//   avg pools:      y = A x (A linear)          dx = A^T dy                  (avg_pool_backward)
//   max unpool:     y = scatter(x, idx)         dx = gather(dy, idx)         (max_unpool_backward)
// Every backward op is linear in grad_output: its derivative w.r.t. grad_output is its adjoint
// (the forward op again, or gather <-> scatter_add) and its tangent is itself applied to
// grad_output's tangent. The input it takes only the shape of gets zeros (torch:
// `self: zeros_like(self)`), except where torch's functional never hands it over: max unpool
// (max_pool_double_backward) and a global average pool (a mean). Indices are never
// differentiable.
//
// Code that runs under torch.compile tracing sees symbolic sizes: only sym_sizes() here.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "autograd/autograd.h"

namespace cnnops::autograd {
namespace {

using c10::IntArrayRef;
using Ints = std::vector<int64_t>;
using TensorPair = std::tuple<Tensor, Tensor>;

CNNOPS_OP_CALL(max_pool_forward, TensorPair(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, bool))
CNNOPS_OP_CALL(max_pool_backward, Tensor(const Tensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef,
                                         IntArrayRef, IntArrayRef, bool))
CNNOPS_OP_CALL(avg_pool_forward, Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool, int64_t))
CNNOPS_OP_CALL(avg_pool_backward,
               Tensor(const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool, int64_t))
CNNOPS_OP_CALL(adaptive_avg_pool_forward, Tensor(const Tensor&, IntArrayRef))
CNNOPS_OP_CALL(adaptive_avg_pool_backward, Tensor(const Tensor&, const Tensor&))
CNNOPS_OP_CALL(adaptive_max_pool_forward, TensorPair(const Tensor&, IntArrayRef))
CNNOPS_OP_CALL(adaptive_max_pool_backward, Tensor(const Tensor&, const Tensor&, const Tensor&))
CNNOPS_OP_CALL(max_unpool_forward, Tensor(const Tensor&, const Tensor&, IntArrayRef))
CNNOPS_OP_CALL(max_unpool_backward, Tensor(const Tensor&, const Tensor&, const Tensor&))

// out[n, c, j] = src[n, c, indices[n, c, j]], shaped like `like` (indices' shape): what a max
// pool's output is of its input. max_unpool_backward is that gather; it wants a non-empty `like`
// (an adaptive pool's output_size may hold a 0).
Tensor gather_planes(const Tensor& src, const Tensor& like, const Tensor& indices) {
  if (like.sym_numel() == 0) return at::zeros_like(like);
  return call::max_unpool_backward(src, like, indices);
}

// What a gather needs of the tensor it takes the shape of: sizes, memory format (dtype and
// device are the gathered tensor's). Saved instead of the tensor, as torch saves only the
// indices for it: the tensor's values may change in place, and need not stay alive.
struct ShapeOf {
  std::vector<c10::SymInt> sizes;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  ShapeOf() = default;
  explicit ShapeOf(const Tensor& t) : sizes(t.sym_sizes().vec()), format(t.suggest_memory_format()) {}
  Tensor empty_like(const Tensor& src) const { return at::empty_symint(sizes, src.options().memory_format(format)); }
};

// The adjoint of gather_planes: out[n, c, indices[n, c, j]] += src[n, c, j], out of size `sizes`.
// Indices repeat (overlapping pool windows, or any unpool indices), so this must add. The pool
// backward ops cannot do it: on CUDA they gather over the pool windows, so they only take indices
// of that pool. aten's scatter_add has the derivatives (gather) and batching rules to go on with.
Tensor scatter_add_planes(const Tensor& src, c10::SymIntArrayRef sizes, const Tensor& indices) {
  const c10::SymInt n = sizes[0], c = sizes[1];
  c10::SymInt plane = 1;
  for (const auto& s : sizes.slice(2)) plane = plane * s;
  c10::SymInt src_plane = 1;
  for (const auto& s : src.sym_sizes().slice(2)) src_plane = src_plane * s;
  Tensor out = src.new_zeros_symint({n, c, plane});
  out = out.scatter_add(2, indices.reshape_symint({n, c, src_plane}), src.reshape_symint({n, c, src_plane}));
  return out.view_symint(sizes);
}

// The int[] an op takes, from sizes that may be symbolic under tracing (specialized, as an int[]
// argument is).
Ints concrete(c10::SymIntArrayRef sizes) {
  Ints out;
  for (const auto& s : sizes) out.push_back(s.guard_int(__FILE__, __LINE__));
  return out;
}

// Base of every Node here: the name, and release_variables over the saved tensors it lists.
template <size_t NumSaved>
struct PoolNode : Node {
  explicit PoolNode(const char* name) : name_(name) {}
  std::string name() const override { return name_; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& v : saved) v.reset_data();
  }
  std::array<SavedVariable, NumSaved> saved;
  variable_list apply(variable_list&& grads) final {
    std::lock_guard<std::mutex> lock(mutex_);
    return compute(std::move(grads));
  }

 protected:
  virtual variable_list compute(variable_list&& grads) = 0;
  Tensor unpack(size_t i) { return saved[i].unpack(getptr()); }

 private:
  const char* name_;
};

struct WindowArgs {
  Ints kernel_size, stride, padding, dilation;
  bool ceil_mode = false;
};
struct AvgArgs {
  Ints kernel_size, stride, padding;
  bool ceil_mode = false, count_include_pad = true;
  int64_t divisor_override = 0;
};

// The gradient of a backward op w.r.t. the input it only takes the shape of (torch's
// `self: zeros_like(self)`), when wanted.
Tensor zeros_if_wanted(Node& node, size_t i, const Tensor& input) {
  return node.task_should_compute_output(i) ? at::zeros_like(input) : Tensor();
}

// Tangent of a max pool backward op, linear in grad_output: the op applied to grad_output's
// tangent. As torch (`result: auto_linear`), a tangent of the input alone gives a zero one.
template <typename F>
void set_max_backward_tangent(const Tensor& result, const Tensor& grad_output, const Tensor& input, F&& op) {
  const Tensor t_grad = tangent(grad_output);
  if (t_grad.defined())
    set_tangent(result, op(t_grad));
  else if (tangent(input).defined())
    set_tangent(result, at::zeros_like(result));
}

// ---------------------------------------------------------------------------------------------
// Max pool
// ---------------------------------------------------------------------------------------------

// saved: input, indices
struct MaxPoolBackward0 : PoolNode<2> {
  MaxPoolBackward0() : PoolNode("MaxPoolBackward0") {}
  WindowArgs a;
  variable_list compute(variable_list&& grads) override {
    variable_list out(1);
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    out[0] = call::max_pool_backward(grads[0], unpack(0), unpack(1), a.kernel_size, a.stride, a.padding, a.dilation,
                                     a.ceil_mode);
    return out;
  }
};

TensorPair max_pool_forward(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                            IntArrayRef dilation, bool ceil_mode) {
  auto node = make_node<MaxPoolBackward0>(input);
  Tensor output, indices;
  {
    BelowAutograd guard;
    std::tie(output, indices) = call::max_pool_forward(input, kernel_size, stride, padding, dilation, ceil_mode);
  }
  if (node) {
    node->a = {kernel_size.vec(), stride.vec(), padding.vec(), dilation.vec(), ceil_mode};
    node->saved[0] = SavedVariable(input, false);
    torch::autograd::set_history(output, node);
    node->saved[1] = SavedVariable(indices, true);
  }
  if (const Tensor t = tangent(input); t.defined()) set_tangent(output, gather_planes(t, output, indices));
  return {output, indices};
}

// Node of max_pool_backward and adaptive_max_pool_backward (both scatter-add grad_output at the
// indices into the input's shape). saved: input, indices
struct MaxPoolBackwardBackward0 : PoolNode<2> {
  explicit MaxPoolBackwardBackward0(const char* name) : PoolNode(name) {}
  MaxPoolBackwardBackward0() : PoolNode("MaxPoolBackwardBackward0") {}
  ShapeOf grad_output;
  variable_list compute(variable_list&& grads) override {
    variable_list out(2);
    if (!grads[0].defined()) return out;
    if (task_should_compute_output(0)) out[0] = gather_planes(grads[0], grad_output.empty_like(grads[0]), unpack(1));
    out[1] = zeros_if_wanted(*this, 1, unpack(0));
    return out;
  }
};
struct AdaptiveMaxPoolBackwardBackward0 : MaxPoolBackwardBackward0 {
  AdaptiveMaxPoolBackwardBackward0() : MaxPoolBackwardBackward0("AdaptiveMaxPoolBackwardBackward0") {}
};

template <typename NodePtr>  // make_node's pointer type (intrusive_ptr or shared_ptr, see autograd.h)
void record_max_backward(Tensor& result, const Tensor& grad_output, const Tensor& input, const Tensor& indices,
                         NodePtr& node) {
  if (!node) return;
  node->grad_output = ShapeOf(grad_output);
  node->saved[0] = SavedVariable(input, false);
  node->saved[1] = SavedVariable(indices, false);
  torch::autograd::set_history(result, node);
}

// The Autograd kernel of a max pool backward op (fixed-window or adaptive): backward(dy, x)
// runs the op on a gradient and an input, below autograd for the result, through autograd for
// the tangent.
template <typename NodeT, typename Backward>
Tensor max_backward_autograd(const Tensor& grad_output, const Tensor& input, const Tensor& indices,
                             const Backward& backward) {
  auto node = make_node<NodeT>(grad_output, input);
  Tensor result;
  {
    BelowAutograd guard;
    result = backward(grad_output, input);
  }
  record_max_backward(result, grad_output, input, indices, node);
  set_max_backward_tangent(result, grad_output, input, [&](const Tensor& t) { return backward(t, primal(input)); });
  return result;
}

Tensor max_pool_backward(const Tensor& grad_output, const Tensor& input, const Tensor& indices, IntArrayRef kernel_size,
                         IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  return max_backward_autograd<MaxPoolBackwardBackward0>(
      grad_output, input, indices, [&](const Tensor& dy, const Tensor& x) {
        return call::max_pool_backward(dy, x, indices, kernel_size, stride, padding, dilation, ceil_mode);
      });
}

// ---------------------------------------------------------------------------------------------
// Average pool
// ---------------------------------------------------------------------------------------------

// saved: input
struct AvgPoolBackward0 : PoolNode<1> {
  AvgPoolBackward0() : PoolNode("AvgPoolBackward0") {}
  AvgArgs a;
  variable_list compute(variable_list&& grads) override {
    variable_list out(1);
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    out[0] = call::avg_pool_backward(grads[0], unpack(0), a.kernel_size, a.stride, a.padding, a.ceil_mode,
                                     a.count_include_pad, a.divisor_override);
    return out;
  }
};

Tensor avg_pool_forward(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                        bool ceil_mode, bool count_include_pad, int64_t divisor_override) {
  auto node = make_node<AvgPoolBackward0>(input);
  Tensor output;
  {
    BelowAutograd guard;
    output =
        call::avg_pool_forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override);
  }
  if (node) {
    node->a = {kernel_size.vec(), stride.vec(), padding.vec(), ceil_mode, count_include_pad, divisor_override};
    node->saved[0] = SavedVariable(input, false);
    torch::autograd::set_history(output, node);
  }
  if (const Tensor t = tangent(input); t.defined())
    set_tangent(output, call::avg_pool_forward(t, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                               divisor_override));
  return output;
}

// saved: input
struct AvgPoolBackwardBackward0 : PoolNode<1> {
  AvgPoolBackwardBackward0() : PoolNode("AvgPoolBackwardBackward0") {}
  AvgArgs a;
  variable_list compute(variable_list&& grads) override {
    variable_list out(2);
    if (!grads[0].defined()) return out;
    if (task_should_compute_output(0))
      out[0] = call::avg_pool_forward(grads[0], a.kernel_size, a.stride, a.padding, a.ceil_mode, a.count_include_pad,
                                      a.divisor_override);
    out[1] = zeros_if_wanted(*this, 1, unpack(0));
    return out;
  }
};

Tensor avg_pool_backward(const Tensor& grad_output, const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                         IntArrayRef padding, bool ceil_mode, bool count_include_pad, int64_t divisor_override) {
  auto node = make_node<AvgPoolBackwardBackward0>(grad_output, input);
  Tensor result;
  {
    BelowAutograd guard;
    result = call::avg_pool_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                     divisor_override);
  }
  if (node) {
    node->a = {kernel_size.vec(), stride.vec(), padding.vec(), ceil_mode, count_include_pad, divisor_override};
    node->saved[0] = SavedVariable(input, false);
    torch::autograd::set_history(result, node);
  }
  // torch's formula holds grad_output's tangent only: the input's alone gives none
  if (const Tensor t = tangent(grad_output); t.defined())
    set_tangent(result, call::avg_pool_backward(t, primal(input), kernel_size, stride, padding, ceil_mode,
                                                count_include_pad, divisor_override));
  return result;
}

// ---------------------------------------------------------------------------------------------
// Adaptive average pool
// ---------------------------------------------------------------------------------------------

// saved: input
struct AdaptiveAvgPoolBackward0 : PoolNode<1> {
  AdaptiveAvgPoolBackward0() : PoolNode("AdaptiveAvgPoolBackward0") {}
  variable_list compute(variable_list&& grads) override {
    variable_list out(1);
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    out[0] = call::adaptive_avg_pool_backward(grads[0], unpack(0));
    return out;
  }
};

Tensor adaptive_avg_pool_forward(const Tensor& input, IntArrayRef output_size) {
  auto node = make_node<AdaptiveAvgPoolBackward0>(input);
  Tensor output;
  {
    BelowAutograd guard;
    output = call::adaptive_avg_pool_forward(input, output_size);
  }
  if (node) {
    node->saved[0] = SavedVariable(input, false);
    torch::autograd::set_history(output, node);
  }
  if (const Tensor t = tangent(input); t.defined())
    set_tangent(output, call::adaptive_avg_pool_forward(t, output_size));
  return output;
}

// saved: input (only when differentiable)
struct AdaptiveAvgPoolBackwardBackward0 : PoolNode<1> {
  AdaptiveAvgPoolBackwardBackward0() : PoolNode("AdaptiveAvgPoolBackwardBackward0") {}
  Ints output_size;  // grad_output's spatial sizes
  bool input_differentiable = true;
  variable_list compute(variable_list&& grads) override {
    variable_list out(input_differentiable ? 2 : 1);
    if (!grads[0].defined()) return out;
    if (task_should_compute_output(0)) out[0] = call::adaptive_avg_pool_forward(grads[0], output_size);
    if (input_differentiable) out[1] = zeros_if_wanted(*this, 1, unpack(0));
    return out;
  }
};

// An output of all 1s is a mean, which torch's functional adaptive avg pools compute as such:
// its backward (an expand) does not take the input, so the input gets no edge then, and a
// gradient's requires_grad is torch's. Otherwise the input gets zeros, as in torch.
bool is_global_average(c10::SymIntArrayRef grad_output_sizes) {
  for (const auto& s : grad_output_sizes.slice(2))
    if (s != 1) return false;
  return true;
}

Tensor adaptive_avg_pool_backward(const Tensor& grad_output, const Tensor& input) {
  const bool input_differentiable = !is_global_average(grad_output.sym_sizes());
  auto node = input_differentiable ? make_node<AdaptiveAvgPoolBackwardBackward0>(grad_output, input)
                                   : make_node<AdaptiveAvgPoolBackwardBackward0>(grad_output);
  Tensor result;
  {
    BelowAutograd guard;
    result = call::adaptive_avg_pool_backward(grad_output, input);
  }
  if (node) {
    node->output_size = concrete(grad_output.sym_sizes().slice(2));
    node->input_differentiable = input_differentiable;
    if (input_differentiable) node->saved[0] = SavedVariable(input, false);
    torch::autograd::set_history(result, node);
  }
  // torch's formula holds grad_output's tangent only: the input's alone gives none
  if (const Tensor t = tangent(grad_output); t.defined())
    set_tangent(result, call::adaptive_avg_pool_backward(t, primal(input)));
  return result;
}

// ---------------------------------------------------------------------------------------------
// Adaptive max pool
// ---------------------------------------------------------------------------------------------

// saved: input, indices
struct AdaptiveMaxPoolBackward0 : PoolNode<2> {
  AdaptiveMaxPoolBackward0() : PoolNode("AdaptiveMaxPoolBackward0") {}
  variable_list compute(variable_list&& grads) override {
    variable_list out(1);
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    out[0] = call::adaptive_max_pool_backward(grads[0], unpack(0), unpack(1));
    return out;
  }
};

TensorPair adaptive_max_pool_forward(const Tensor& input, IntArrayRef output_size) {
  auto node = make_node<AdaptiveMaxPoolBackward0>(input);
  Tensor output, indices;
  {
    BelowAutograd guard;
    std::tie(output, indices) = call::adaptive_max_pool_forward(input, output_size);
  }
  if (node) {
    node->saved[0] = SavedVariable(input, false);
    torch::autograd::set_history(output, node);
    node->saved[1] = SavedVariable(indices, true);
  }
  if (const Tensor t = tangent(input); t.defined()) set_tangent(output, gather_planes(t, output, indices));
  return {output, indices};
}

Tensor adaptive_max_pool_backward(const Tensor& grad_output, const Tensor& input, const Tensor& indices) {
  return max_backward_autograd<AdaptiveMaxPoolBackwardBackward0>(
      grad_output, input, indices,
      [&](const Tensor& dy, const Tensor& x) { return call::adaptive_max_pool_backward(dy, x, indices); });
}

// ---------------------------------------------------------------------------------------------
// Max unpool
// ---------------------------------------------------------------------------------------------

// saved: indices
struct MaxUnpoolBackward0 : PoolNode<1> {
  MaxUnpoolBackward0() : PoolNode("MaxUnpoolBackward0") {}
  ShapeOf input;
  variable_list compute(variable_list&& grads) override {
    variable_list out(1);
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    out[0] = call::max_unpool_backward(grads[0], input.empty_like(grads[0]), unpack(0));
    return out;
  }
};

Tensor max_unpool_forward(const Tensor& input, const Tensor& indices, IntArrayRef output_size) {
  auto node = make_node<MaxUnpoolBackward0>(input);
  Tensor output;
  {
    BelowAutograd guard;
    output = call::max_unpool_forward(input, indices, output_size);
  }
  if (node) {
    node->input = ShapeOf(input);
    node->saved[0] = SavedVariable(indices, false);
    torch::autograd::set_history(output, node);
  }
  if (const Tensor t = tangent(input); t.defined())
    set_tangent(output, call::max_unpool_forward(t, indices, output_size));
  return output;
}

// max_unpool_backward takes `input` for its shape only, so (as torch's max_pool_double_backward,
// which is not given it) only grad_output is differentiable. saved: indices
struct MaxUnpoolBackwardBackward0 : PoolNode<1> {
  MaxUnpoolBackwardBackward0() : PoolNode("MaxUnpoolBackwardBackward0") {}
  std::vector<c10::SymInt> grad_output_sizes;
  variable_list compute(variable_list&& grads) override {
    variable_list out(1);
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    out[0] = scatter_add_planes(grads[0], grad_output_sizes, unpack(0));
    return out;
  }
};

Tensor max_unpool_backward(const Tensor& grad_output, const Tensor& input, const Tensor& indices) {
  auto node = make_node<MaxUnpoolBackwardBackward0>(grad_output);
  Tensor result;
  {
    BelowAutograd guard;
    result = call::max_unpool_backward(grad_output, input, indices);
  }
  if (node) {
    node->grad_output_sizes = grad_output.sym_sizes().vec();
    node->saved[0] = SavedVariable(indices, false);
    torch::autograd::set_history(result, node);
  }
  if (const Tensor t = tangent(grad_output); t.defined())
    set_tangent(result, call::max_unpool_backward(t, primal(input), indices));
  return result;
}

}  // namespace
}  // namespace cnnops::autograd

TORCH_LIBRARY_IMPL(cnnops, Autograd, m) {
  namespace a = cnnops::autograd;
  m.impl("max_pool_forward", &a::max_pool_forward);
  m.impl("max_pool_backward", &a::max_pool_backward);
  m.impl("avg_pool_forward", &a::avg_pool_forward);
  m.impl("avg_pool_backward", &a::avg_pool_backward);
  m.impl("adaptive_avg_pool_forward", &a::adaptive_avg_pool_forward);
  m.impl("adaptive_avg_pool_backward", &a::adaptive_avg_pool_backward);
  m.impl("adaptive_max_pool_forward", &a::adaptive_max_pool_forward);
  m.impl("adaptive_max_pool_backward", &a::adaptive_max_pool_backward);
  m.impl("max_unpool_forward", &a::max_unpool_forward);
  m.impl("max_unpool_backward", &a::max_unpool_backward);
}
