// Autograd of convolution: conv_forward and conv_backward, each differentiable (double backward).
//
// y = conv(x, w) + b is bilinear in (x, w), so every derivative is a convolution again:
//   dx = conv_backward_input(dy, w)      dw = conv_backward_weight(dy, x)      db = sum(dy)
// and conv_backward, bilinear in dy and (x, w), differentiates into
//   d(dy) = conv(ggx, w) + conv(x, ggw) + ggb      (the forward map applied to each incoming grad)
//   d(x)  = conv_backward_input(dy, ggw)           (from <ggw, dw(dy, x)>)
//   d(w)  = conv_backward_weight(dy, ggx)          (from <ggx, dx(dy, w)>)
// as torch's convolution double backward. activation="relu" multiplies dy by [y > 0] first
// (torch's threshold_backward, whose own derivative w.r.t. y is zero).
#include <ATen/ops/threshold_backward.h>
#include <torch/library.h>

#include <string>

#include "autograd/autograd.h"

namespace cnnops::autograd {
namespace {

using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
CNNOPS_OP_CALL(conv_forward, Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::IntArrayRef,
                                    c10::IntArrayRef, c10::IntArrayRef, int64_t, c10::string_view))
CNNOPS_OP_CALL(conv_backward, Tensor3(const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                      c10::IntArrayRef, int64_t, std::array<bool, 3>))

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  Tensor forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b = std::nullopt) const {
    return call::conv_forward(x, w, b, stride, padding, dilation, groups, "none");
  }
  Tensor3 backward(const Tensor& dy, const Tensor& x, const Tensor& w, std::array<bool, 3> mask) const {
    return call::conv_backward(dy, x, w, stride, padding, dilation, groups, mask);
  }
};

// b broadcast over N x C x spatial: a (1, C, 1, ...) view.
Tensor bias_view(const Tensor& b, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = b.numel();
  return b.reshape(shape);
}

struct ConvForwardBackward : Node {
  ConvArgs args;
  bool has_bias = false, relu = false;
  SavedVariable input_, weight_, output_;

  variable_list apply(variable_list&& grads) override {
    variable_list result(3);
    Tensor dy = grads[0];
    if (!dy.defined()) return result;
    if (relu) dy = at::threshold_backward(dy, output_.unpack(getptr()), 0);
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   has_bias && task_should_compute_output(2)};
    if (!(mask[0] || mask[1] || mask[2])) return result;
    auto [dx, dw, db] = args.backward(dy, input_.unpack(), weight_.unpack(), mask);
    result[0] = undefined_unless(mask[0], dx);
    result[1] = undefined_unless(mask[1], dw);
    result[2] = undefined_unless(mask[2], db);
    return result;
  }
  std::string name() const override { return "cnnops::ConvForwardBackward"; }
  void release_variables() override {
    input_.reset_data();
    weight_.reset_data();
    output_.reset_data();
  }
};

Tensor conv_forward_autograd(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                             c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                             int64_t groups, c10::string_view activation) {
  Tensor output = [&] {
    BelowAutograd guard;
    return call::conv_forward(input, weight, bias, stride, padding, dilation, groups, activation);
  }();
  const bool relu = activation == "relu";
  const ConvArgs args{stride.vec(), padding.vec(), dilation.vec(), groups};
  if (auto node = make_node<ConvForwardBackward>(input, weight, bias)) {
    node->args = args;
    node->has_bias = bias.has_value() && bias->defined();
    node->relu = relu;
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(weight, false);
    torch::autograd::set_history(output, node);
    if (relu) node->output_ = SavedVariable(output, true);
  }
  // jvp: conv(tx, w) + conv(x, tw) + tb, masked by the ReLU.
  const Tensor tx = tangent(input), tw = tangent(weight), tb = tangent(bias);
  if (tx.defined() || tw.defined() || tb.defined()) {
    Tensor t;
    if (tx.defined()) t = args.forward(tx, primal(weight));
    if (tw.defined()) t = add_defined(t, args.forward(primal(input), tw));
    if (tb.defined())
      t = t.defined() ? t.add(bias_view(tb, output.dim())) : bias_view(tb, output.dim()).expand_as(output).clone();
    if (relu) t = at::threshold_backward(t, primal(output), 0);
    set_tangent(output, t);
  }
  return output;
}

struct ConvBackwardBackward : Node {
  ConvArgs args;
  std::array<bool, 3> output_mask{};
  SavedVariable grad_output_, input_, weight_;

  variable_list apply(variable_list&& grads) override {
    variable_list result(3);
    const Tensor ggx = output_mask[0] ? grads[0] : Tensor();
    const Tensor ggw = output_mask[1] ? grads[1] : Tensor();
    const Tensor ggb = output_mask[2] ? grads[2] : Tensor();
    const Tensor dy = grad_output_.unpack(), x = input_.unpack(), w = weight_.unpack();
    if (task_should_compute_output(0)) {
      Tensor d_dy;
      if (ggx.defined()) d_dy = args.forward(ggx, w);
      if (ggw.defined()) d_dy = add_defined(d_dy, args.forward(x, ggw));
      if (ggb.defined())
        d_dy = d_dy.defined() ? d_dy.add(bias_view(ggb, dy.dim())) : bias_view(ggb, dy.dim()).expand_as(dy).clone();
      result[0] = d_dy;
    }
    if (task_should_compute_output(1) && ggw.defined())
      result[1] = std::get<0>(args.backward(dy, x, ggw, {true, false, false}));
    if (task_should_compute_output(2) && ggx.defined())
      result[2] = std::get<1>(args.backward(dy, ggx, w, {false, true, false}));
    return result;
  }
  std::string name() const override { return "cnnops::ConvBackwardBackward"; }
  void release_variables() override {
    grad_output_.reset_data();
    input_.reset_data();
    weight_.reset_data();
  }
};

Tensor3 conv_backward_autograd(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               int64_t groups, std::array<bool, 3> output_mask) {
  auto [dx, dw, db] = [&] {
    BelowAutograd guard;
    return call::conv_backward(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
  }();
  const ConvArgs args{stride.vec(), padding.vec(), dilation.vec(), groups};
  if (auto node = make_node<ConvBackwardBackward>(grad_output, input, weight)) {
    node->args = args;
    node->output_mask = output_mask;
    node->grad_output_ = SavedVariable(grad_output, false);
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(weight, false);
    // The left-out gradients are empty placeholders: they get history too (the node needs one
    // input per output), and apply() ignores whatever reaches them.
    torch::autograd::set_history(dx, node);
    torch::autograd::set_history(dw, node);
    torch::autograd::set_history(db, node);
  }
  // jvp of a bilinear map: B(t_dy, x, w) + B(dy, t_x, w) + B(dy, x, t_w), term by term.
  const Tensor t_dy = tangent(grad_output), tx = tangent(input), tw = tangent(weight);
  if (t_dy.defined() || tx.defined() || tw.defined()) {
    const Tensor dy_p = primal(grad_output), x_p = primal(input), w_p = primal(weight);
    Tensor t_dx, t_dw, t_db;
    if (t_dy.defined()) std::tie(t_dx, t_dw, t_db) = args.backward(t_dy, x_p, w_p, output_mask);
    if (tw.defined() && output_mask[0])
      t_dx = add_defined(t_dx, std::get<0>(args.backward(dy_p, x_p, tw, {true, false, false})));
    if (tx.defined() && output_mask[1])
      t_dw = add_defined(t_dw, std::get<1>(args.backward(dy_p, tx, w_p, {false, true, false})));
    if (output_mask[0] && t_dx.defined()) set_tangent(dx, t_dx);
    if (output_mask[1] && t_dw.defined()) set_tangent(dw, t_dw);
    if (output_mask[2] && t_db.defined()) set_tangent(db, t_db);
  }
  return {dx, dw, db};
}

}  // namespace
}  // namespace cnnops::autograd

TORCH_LIBRARY_IMPL(cnnops, Autograd, m) {
  m.impl("conv_forward", &cnnops::autograd::conv_forward_autograd);
  m.impl("conv_backward", &cnnops::autograd::conv_backward_autograd);
}
