// Autograd kernels of the normalization ops: batch, layer and group norm (forward and backward)
// and the SyncBatchNorm pieces. The pattern is autograd.h's.
//
// Every norm normalizes sets of M values: xhat = (x - mean) * invstd, y = w * xhat + b. The
// forward ops' Nodes call the backward ops (our kernels) with the saved mean/invstd, which are
// non-differentiable outputs. The backward ops are differentiable in turn: their Nodes evaluate
// the second derivatives (norm_double_backward) as a composite of aten elementwise and
// reduction ops, as torch's batchnorm_double_backward and layer_norm_double_backward do, with
// mean and invstd functions of the input (training) or constants (batch norm in eval). The
// composite is differentiable itself, so every higher order works too.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "autograd/autograd.h"

namespace cnnops::autograd {
namespace {

using OptTensor = std::optional<Tensor>;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;
using Mask = std::array<bool, 3>;

CNNOPS_OP_CALL(batch_norm_forward, TensorTriple(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                                const OptTensor&, bool, double, double))
CNNOPS_OP_CALL(batch_norm_backward,
               TensorTriple(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, bool, Mask))
CNNOPS_OP_CALL(layer_norm_forward,
               TensorTriple(const Tensor&, c10::IntArrayRef, const OptTensor&, const OptTensor&, double))
CNNOPS_OP_CALL(layer_norm_backward, TensorTriple(const Tensor&, const Tensor&, c10::IntArrayRef, const Tensor&,
                                                 const Tensor&, const OptTensor&, Mask))
CNNOPS_OP_CALL(group_norm_forward, TensorTriple(const Tensor&, const OptTensor&, const OptTensor&, int64_t, double))
CNNOPS_OP_CALL(group_norm_backward, TensorTriple(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const OptTensor&, int64_t, Mask))
CNNOPS_OP_CALL(batch_norm_stats, std::tuple<Tensor, Tensor>(const Tensor&))
CNNOPS_OP_CALL(batch_norm_elemt,
               Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&))
CNNOPS_OP_CALL(batch_norm_backward_elemt, Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const OptTensor&, const Tensor&, const Tensor&, int64_t))

Tensor value(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// ============================================================================================
// Geometry and math shared by the three norms
// ============================================================================================

enum class Kind { Batch, Layer, Group };

// The ops' non-tensor arguments that fix which values share a statistic.
struct NormSpec {
  Kind kind = Kind::Batch;
  bool training = true;                   // statistics of the input (false: batch norm in eval, constants)
  std::vector<int64_t> normalized_shape;  // layer norm
  int64_t num_groups = 1;                 // group norm
};

const char* backward_name(Kind k) {
  return k == Kind::Batch   ? "batch_norm_backward()"
         : k == Kind::Layer ? "layer_norm_backward()"
                            : "group_norm_backward()";
}

// The input viewed so that each statistic covers whole dims: batch norm N x C x S (statistics
// per channel), group norm N x G x C/G x S (per sample and group), layer norm L x K (per row).
// The weight is viewed to broadcast against it; param_dims are the dims its gradient sums over.
struct Geometry {
  std::vector<int64_t> view, stat_view, param_view, stat_dims, param_dims, param_shape;
};

Geometry geometry(const NormSpec& spec, c10::IntArrayRef sizes) {
  Geometry g;
  if (spec.kind == Kind::Layer) {
    const auto axis = static_cast<int64_t>(sizes.size() - spec.normalized_shape.size());
    const int64_t L = c10::multiply_integers(sizes.begin(), sizes.begin() + axis);
    const int64_t K = c10::multiply_integers(sizes.begin() + axis, sizes.end());
    g.view = {L, K};
    g.stat_view = {L, 1};
    g.param_view = {1, K};
    g.stat_dims = {1};
    g.param_dims = {0};
    g.param_shape = spec.normalized_shape;
    return g;
  }
  const int64_t N = sizes[0], C = sizes[1];
  const int64_t S = c10::multiply_integers(sizes.begin() + 2, sizes.end());
  g.param_shape = {C};
  if (spec.kind == Kind::Batch) {
    g.view = {N, C, S};
    g.stat_view = {1, C, 1};
    g.param_view = {1, C, 1};
    g.stat_dims = {0, 2};
    g.param_dims = {0, 2};
  } else {
    const int64_t G = spec.num_groups, D = C / G;
    g.view = {N, G, D, S};
    g.stat_view = {N, G, 1, 1};
    g.param_view = {1, G, D, 1};
    g.stat_dims = {2, 3};
    g.param_dims = {0, 3};
  }
  return g;
}

// xhat and the linear maps around it, in the statistics' (opmath) dtype.
struct NormMath {
  Geometry g;
  bool training;
  at::ScalarType acc;
  Tensor s, xhat;  // invstd and xhat, viewed

  NormMath(const NormSpec& spec, const Tensor& input, const Tensor& mean, const Tensor& invstd)
      : g(geometry(spec, input.sizes())), training(spec.training), acc(mean.scalar_type()) {
    const Tensor x = view(input);
    Tensor mu = mean.reshape(g.stat_view);
    s = invstd.reshape(g.stat_view);
    if (training) {
      // mean and invstd are the input's statistics: their saved values, with the derivatives
      // (of every order) of E[x] and (V + eps)^(-1/2), V = E[(x - E[x])^2], added through
      // zero-valued terms: invstd (1 + (V - V0) invstd^2)^(-1/2) = (V + eps)^(-1/2) for
      // invstd = (V0 + eps)^(-1/2). Higher derivatives of the composites below need them.
      const Tensor m = E(x);
      const Tensor var = E((x - m).square());
      mu = mu + (m - m.detach());
      s = s * (1 + (var - var.detach()) * s.square()).rsqrt();
    }
    xhat = (x - mu) * s;
  }
  Tensor view(const Tensor& t) const { return t.to(acc).reshape(g.view); }
  Tensor param(const Tensor& t) const { return t.to(acc).reshape(g.param_view); }
  Tensor E(const Tensor& t) const { return t.mean(g.stat_dims, /*keepdim=*/true); }
  // P(v) = v - E[v] - xhat E[xhat v]: self-adjoint, and d xhat = invstd * P(dx) in training.
  Tensor P(const Tensor& v) const { return v - E(v) - xhat * E(xhat * v); }
  Tensor dxhat(const Tensor& dx) const { return training ? s * P(dx) : s * dx; }
  Tensor param_sum(const Tensor& t) const { return t.sum(g.param_dims).reshape(g.param_shape); }
  Tensor full(const Tensor& param_viewed) const { return param_viewed.expand(g.view); }
  static Tensor back(const Tensor& t, const Tensor& like) {
    return t.defined() ? t.reshape(like.sizes()).to(like.scalar_type()) : t;
  }
};

// Tangent of y = w * xhat + b: w * dxhat(tx) + tw * xhat + tb (torch's batch_norm_jvp,
// layer_norm_jvp and group_norm_jvp in one).
Tensor norm_jvp(const NormSpec& spec, const Tensor& input, const Tensor& weight, const Tensor& mean,
                const Tensor& invstd, const Tensor& tx, const Tensor& tw, const Tensor& tb, const Tensor& out) {
  const NormMath m(spec, input, mean, invstd);
  Tensor t;
  if (tx.defined()) {
    t = m.dxhat(m.view(tx));
    if (weight.defined()) t = t * m.param(weight);
  }
  if (tw.defined()) t = add_defined(t, m.xhat * m.param(tw));
  if (tb.defined()) t = t.defined() ? t + m.param(tb) : m.full(m.param(tb));
  return NormMath::back(t, out);
}

// Second derivatives of the norm backward gI = invstd * P(w * gO) (training; invstd * w * gO in
// eval), gW = sum(gO * xhat), gB = sum(gO), given cotangents ggI, ggW, ggB of (gI, gW, gB).
// Returns the derivatives w.r.t. (grad_output, input, weight), those `need` asks for:
//   d/dgO = w invstd P(ggI) + ggW xhat + ggB,   d/dw = sum(gO invstd P(ggI)),
//   d/dx  = invstd P(ggW gO) - invstd^2 (c xhat + E[xhat g] P(ggI) + E[ggI xhat] P(g)),
// with g = w gO and c = E[ggI g] - E[ggI] E[g] - E[ggI xhat] E[xhat g] (from d invstd =
// -invstd^2 E[xhat dx] and d xhat = invstd P(dx); the second term vanishes in eval).
TensorTriple norm_double_backward(const NormSpec& spec, const Tensor& grad_output, const Tensor& input,
                                  const Tensor& weight, const Tensor& mean, const Tensor& invstd, const Tensor& ggI,
                                  const Tensor& ggW, const Tensor& ggB, Mask need) {
  const NormMath m(spec, input, mean, invstd);
  const Tensor gO = m.view(grad_output);
  const Tensor w = weight.defined() ? m.param(weight) : Tensor();
  const Tensor u = ggI.defined() ? m.view(ggI) : Tensor();
  const Tensor u_w = ggW.defined() ? m.param(ggW) : Tensor();
  const Tensor u_b = ggB.defined() ? m.param(ggB) : Tensor();
  const Tensor s_pu = u.defined() ? m.dxhat(u) : Tensor();  // invstd P(ggI)
  Tensor d_gO, d_x, d_w;
  if (need[0]) {
    if (u.defined()) d_gO = w.defined() ? s_pu * w : s_pu;
    if (u_w.defined()) d_gO = add_defined(d_gO, m.xhat * u_w);
    if (u_b.defined()) d_gO = d_gO.defined() ? d_gO + u_b : m.full(u_b);
  }
  if (need[1]) {
    if (u_w.defined()) d_x = m.dxhat(gO * u_w);
    if (u.defined() && spec.training) {
      const Tensor g = w.defined() ? gO * w : gO;
      const Tensor e_u_xhat = m.E(u * m.xhat), e_xhat_g = m.E(m.xhat * g);
      const Tensor c = m.E(u * g) - m.E(u) * m.E(g) - e_u_xhat * e_xhat_g;
      d_x = add_defined(d_x, -(m.s * m.s) * (c * m.xhat + e_xhat_g * m.P(u) + e_u_xhat * m.P(g)));
    }
  }
  if (need[2] && w.defined() && u.defined()) d_w = m.param_sum(gO * s_pu).to(weight.scalar_type());
  return {NormMath::back(d_gO, grad_output), NormMath::back(d_x, input), d_w};
}

TensorTriple call_backward(const NormSpec& spec, const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                           const Tensor& mean, const Tensor& invstd, Mask mask) {
  switch (spec.kind) {
    case Kind::Batch:
      return call::batch_norm_backward(grad_output, input, optional(weight), mean, invstd, spec.training, mask);
    case Kind::Layer:
      return call::layer_norm_backward(grad_output, input, spec.normalized_shape, mean, invstd, optional(weight), mask);
    case Kind::Group:
      break;
  }
  return call::group_norm_backward(grad_output, input, mean, invstd, optional(weight), spec.num_groups, mask);
}

// ============================================================================================
// Forward ops: output differentiable, mean/invstd not
// ============================================================================================

struct NormBackward : public Node {
  NormSpec spec;
  SavedVariable input_, weight_, mean_, invstd_;
  bool has_bias = false;
  // Without a weight, a bias of another dtype than the input's (float bias, bfloat16 input)
  // gets a unit weight of its dtype in the backward op, which returns grad_bias in the
  // weight's dtype: exact, and no detour through bfloat16.
  std::optional<at::ScalarType> unit_weight_dtype;

  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    const Tensor& grad = grads[0];
    const Mask mask{task_should_compute_output(0), task_should_compute_output(1),
                    has_bias && task_should_compute_output(2)};
    if (!grad.defined() || !(mask[0] || mask[1] || mask[2])) return out;
    const Tensor input = input_.unpack();
    Tensor weight = weight_.unpack();
    if (!weight.defined() && unit_weight_dtype)
      weight = at::ones(geometry(spec, input.sizes()).param_shape, input.options().dtype(*unit_weight_dtype));
    auto [gi, gw, gb] = call_backward(spec, grad, input, weight, mean_.unpack(), invstd_.unpack(), mask);
    out[0] = undefined_unless(mask[0], std::move(gi));
    out[1] = undefined_unless(mask[1], std::move(gw));
    out[2] = undefined_unless(mask[2], std::move(gb));
    return out;
  }
  std::string name() const override {
    return spec.kind == Kind::Batch   ? "CnnopsBatchNormBackward"
           : spec.kind == Kind::Layer ? "CnnopsLayerNormBackward"
                                      : "CnnopsGroupNormBackward";
  }
  void release_variables() override {
    input_.reset_data();
    weight_.reset_data();
    mean_.reset_data();
    invstd_.reset_data();
  }
};

template <typename Run>
TensorTriple norm_forward_autograd(const NormSpec& spec, const Tensor& input, const OptTensor& weight,
                                   const OptTensor& bias, Run&& run) {
  auto node = make_node<NormBackward>(input, weight, bias);
  TensorTriple result = [&] {
    BelowAutograd guard;
    return run();
  }();
  const Tensor& out = std::get<0>(result);
  const Tensor& mean = std::get<1>(result);
  const Tensor& invstd = std::get<2>(result);
  const Tensor w = value(weight), b = value(bias);
  if (node) {
    node->spec = spec;
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(w, false);
    node->mean_ = SavedVariable(mean, false);
    node->invstd_ = SavedVariable(invstd, false);
    node->has_bias = b.defined();
    if (!w.defined() && b.defined() && b.scalar_type() != input.scalar_type())
      node->unit_weight_dtype = b.scalar_type();
    torch::autograd::set_history(std::get<0>(result), node);
  }
  const Tensor tx = tangent(input), tw = tangent(w), tb = tangent(b);
  if (tx.defined() || tw.defined() || tb.defined())
    set_tangent(out, norm_jvp(spec, primal(input), primal(w), mean, invstd, tx, tw, tb, out));
  return result;
}

// Running statistics are buffers updated in place, never differentiated (as torch).
void check_running_stat(const OptTensor& t, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(!(t->requires_grad() && at::GradMode::is_enabled()),
              "batch_norm_forward(): the function is not differentiable with respect to argument '", name,
              "'. This input cannot have requires_grad True.");
  TORCH_CHECK_NOT_IMPLEMENTED(!tangent(t).defined(), "batch_norm_forward(): forward-mode AD with respect to ", name,
                              " is not supported (running statistics are buffers, not differentiable inputs)");
}

TensorTriple batch_norm_forward_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                         const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                         double momentum, double eps) {
  check_running_stat(running_mean, "running_mean");
  check_running_stat(running_var, "running_var");
  NormSpec spec;
  spec.kind = Kind::Batch;
  spec.training = training;
  auto result = norm_forward_autograd(spec, input, weight, bias, [&] {
    return call::batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps);
  });
  // The kernel updated them in place below ADInplaceOrView: bump their versions as it would.
  if (training) {
    for (const OptTensor* t : {&running_mean, &running_var})
      if (t->has_value() && (*t)->defined()) torch::autograd::impl::bump_version(**t);
  }
  return result;
}

TensorTriple layer_norm_forward_autograd(const Tensor& input, c10::IntArrayRef normalized_shape,
                                         const OptTensor& weight, const OptTensor& bias, double eps) {
  NormSpec spec;
  spec.kind = Kind::Layer;
  spec.normalized_shape = normalized_shape.vec();
  return norm_forward_autograd(spec, input, weight, bias,
                               [&] { return call::layer_norm_forward(input, normalized_shape, weight, bias, eps); });
}

TensorTriple group_norm_forward_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                         int64_t num_groups, double eps) {
  NormSpec spec;
  spec.kind = Kind::Group;
  spec.num_groups = num_groups;
  return norm_forward_autograd(spec, input, weight, bias,
                               [&] { return call::group_norm_forward(input, weight, bias, num_groups, eps); });
}

// ============================================================================================
// Backward ops: differentiable w.r.t. grad_output, input and weight
// ============================================================================================
// mean and invstd are the forward's saved statistics: the second derivatives already count
// them as functions of the input, so gradients w.r.t. them as separate inputs are not
// implemented (as torch's native_batch_norm_backward: not_implemented("save_mean")).

// Edges (and apply()'s outputs): grad_output, input, weight, mean, invstd.
struct NormBackwardBackward : public Node {
  NormSpec spec;
  Mask output_mask{};
  SavedVariable grad_output_, input_, weight_, mean_, invstd_;

  variable_list apply(variable_list&& grads) override {
    variable_list out(5);
    // Outputs the op's output_mask left out are empty tensors without history: no gradient.
    const Tensor ggI = output_mask[0] ? grads[0] : Tensor();
    const Tensor ggW = output_mask[1] ? grads[1] : Tensor();
    const Tensor ggB = output_mask[2] ? grads[2] : Tensor();
    if (!ggI.defined() && !ggW.defined() && !ggB.defined()) return out;
    TORCH_CHECK_NOT_IMPLEMENTED(!task_should_compute_output(3) && !task_should_compute_output(4),
                                backward_name(spec.kind),
                                ": the derivative with respect to mean and invstd is not implemented (they are the "
                                "forward's saved statistics; the derivative w.r.t. input already counts them)");
    const Mask need{task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2)};
    if (!(need[0] || need[1] || need[2])) return out;
    auto [d_gO, d_x, d_w] = norm_double_backward(spec, grad_output_.unpack(), input_.unpack(), weight_.unpack(),
                                                 mean_.unpack(), invstd_.unpack(), ggI, ggW, ggB, need);
    out[0] = std::move(d_gO);
    out[1] = std::move(d_x);
    out[2] = std::move(d_w);
    return out;
  }
  std::string name() const override {
    return spec.kind == Kind::Batch   ? "CnnopsBatchNormBackwardBackward"
           : spec.kind == Kind::Layer ? "CnnopsLayerNormBackwardBackward"
                                      : "CnnopsGroupNormBackwardBackward";
  }
  void release_variables() override {
    grad_output_.reset_data();
    input_.reset_data();
    weight_.reset_data();
    mean_.reset_data();
    invstd_.reset_data();
  }
};

TensorTriple norm_backward_autograd(const NormSpec& spec, const Tensor& grad_output, const Tensor& input,
                                    const OptTensor& weight, const Tensor& mean, const Tensor& invstd, Mask mask) {
  const Tensor w = value(weight);
  auto node = make_node<NormBackwardBackward>(grad_output, input, weight, mean, invstd);
  TensorTriple result = [&] {
    BelowAutograd guard;
    return call_backward(spec, grad_output, input, w, mean, invstd, mask);
  }();
  std::array<Tensor*, 3> outs{&std::get<0>(result), &std::get<1>(result), &std::get<2>(result)};
  if (node) {
    node->spec = spec;
    node->output_mask = mask;
    node->grad_output_ = SavedVariable(grad_output, false);
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(w, false);
    node->mean_ = SavedVariable(mean, false);
    node->invstd_ = SavedVariable(invstd, false);
    for (int i = 0; i < 3; ++i) {
      if (mask[i])
        torch::autograd::set_history(*outs[i], node);
      else
        node->add_input_metadata(Node::undefined_input());
    }
  }
  // Forward-mode AD. The outputs are (gI, gW, gB) = dL/d(x, w, b) of L = <gO, y(x, w, b)>, so
  // their tangent is the backward op applied to the tangent of gO (L is linear in gO) plus
  // the Hessian of L times (tx, tw), which (the Hessian being symmetric) is what the double
  // backward gives for the cotangents (ggI, ggW) = (tx, tw).
  const Tensor t_gO = tangent(grad_output), tx = tangent(input), tw = tangent(w);
  TORCH_CHECK_NOT_IMPLEMENTED(!tangent(mean).defined() && !tangent(invstd).defined(), backward_name(spec.kind),
                              ": forward-mode AD with respect to mean and invstd is not implemented");
  if (t_gO.defined() || tx.defined() || tw.defined()) {
    const Tensor x_p = primal(input), w_p = primal(w), mean_p = primal(mean), invstd_p = primal(invstd);
    std::array<Tensor, 3> t;
    if (t_gO.defined()) {
      auto [a, b, c] = call_backward(spec, t_gO, x_p, w_p, mean_p, invstd_p, mask);
      t = {undefined_unless(mask[0], a), undefined_unless(mask[1], b), undefined_unless(mask[2], c)};
    }
    if ((tx.defined() || tw.defined()) && (mask[0] || mask[1])) {
      auto [unused, d_x, d_w] = norm_double_backward(spec, primal(grad_output), x_p, w_p, mean_p, invstd_p, tx, tw,
                                                     Tensor(), {false, mask[0], mask[1]});
      t[0] = add_defined(t[0], d_x);
      t[1] = add_defined(t[1], d_w);
    }
    for (int i = 0; i < 3; ++i)
      if (mask[i]) set_tangent(*outs[i], t[i]);
  }
  return result;
}

TensorTriple batch_norm_backward_autograd(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                          const Tensor& mean, const Tensor& invstd, bool training, Mask mask) {
  NormSpec spec;
  spec.kind = Kind::Batch;
  spec.training = training;
  return norm_backward_autograd(spec, grad_output, input, weight, mean, invstd, mask);
}

TensorTriple layer_norm_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                          c10::IntArrayRef normalized_shape, const Tensor& mean, const Tensor& invstd,
                                          const OptTensor& weight, Mask mask) {
  NormSpec spec;
  spec.kind = Kind::Layer;
  spec.normalized_shape = normalized_shape.vec();
  return norm_backward_autograd(spec, grad_output, input, weight, mean, invstd, mask);
}

TensorTriple group_norm_backward_autograd(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                          const Tensor& invstd, const OptTensor& weight, int64_t num_groups,
                                          Mask mask) {
  NormSpec spec;
  spec.kind = Kind::Group;
  spec.num_groups = num_groups;
  return norm_backward_autograd(spec, grad_output, input, weight, mean, invstd, mask);
}

// ============================================================================================
// SyncBatchNorm pieces: elementwise formulas and per-channel sums, differentiated as
// composites of aten ops (each differentiable again).
// ============================================================================================

// N x C x * viewed as N x C x S in the statistics' dtype; per-channel vectors as 1 x C x 1.
struct ChannelView {
  int64_t N, C, S;
  at::ScalarType acc;
  ChannelView(const Tensor& input, at::ScalarType acc_) : acc(acc_) {
    N = input.size(0);
    C = input.size(1);
    S = c10::multiply_integers(input.sizes().begin() + 2, input.sizes().end());
  }
  Tensor x(const Tensor& t) const { return t.to(acc).reshape({N, C, S}); }
  Tensor c(const Tensor& t) const { return t.to(acc).reshape({1, C, 1}); }
  Tensor sum(const Tensor& t) const { return t.sum(c10::IntArrayRef{0, 2}); }  // per channel
  static Tensor back(const Tensor& t, const Tensor& like) {
    return t.defined() ? t.reshape(like.sizes()).to(like.scalar_type()) : t;
  }
};

// batch_norm_stats: mean = E[x], m2 = sum((x - mean)^2) per channel.
// d mean/dx = 1/M, d m2/dx = 2 (x - mean) (the mean's own change sums to zero).
struct BatchNormStatsBackward : public Node {
  SavedVariable input_, mean_;  // mean_: an output, so its own history is kept for higher orders

  variable_list apply(variable_list&& grads) override {
    variable_list out(1);
    const Tensor &g_mean = grads[0], &g_m2 = grads[1];
    if ((!g_mean.defined() && !g_m2.defined()) || !task_should_compute_output(0)) return out;
    const Tensor input = input_.unpack(), mean = mean_.unpack(getptr());
    const ChannelView v(input, mean.scalar_type());
    Tensor g;
    if (g_mean.defined() && v.N * v.S > 0) g = v.c(g_mean).div(static_cast<double>(v.N * v.S)).expand({v.N, v.C, v.S});
    if (g_m2.defined()) g = add_defined(g, 2 * v.c(g_m2) * (v.x(input) - v.c(mean)));
    out[0] = g.defined() ? ChannelView::back(g, input) : at::zeros_like(input);
    return out;
  }
  std::string name() const override { return "CnnopsBatchNormStatsBackward"; }
  void release_variables() override {
    input_.reset_data();
    mean_.reset_data();
  }
};

std::tuple<Tensor, Tensor> batch_norm_stats_autograd(const Tensor& input) {
  auto node = make_node<BatchNormStatsBackward>(input);
  auto result = [&] {
    BelowAutograd guard;
    return call::batch_norm_stats(input);
  }();
  Tensor& mean = std::get<0>(result);
  Tensor& m2 = std::get<1>(result);
  if (node) {
    node->input_ = SavedVariable(input, false);
    torch::autograd::set_history(mean, node);
    torch::autograd::set_history(m2, node);
    node->mean_ = SavedVariable(mean, true);
  }
  const Tensor tx = tangent(input);
  if (tx.defined()) {
    const Tensor x = primal(input);
    const ChannelView v(x, mean.scalar_type());
    const Tensor t = v.x(tx);
    // both computed before either is set: m2's uses the mean's value
    const Tensor t_mean = t.mean(c10::IntArrayRef{0, 2}), t_m2 = v.sum(2 * (v.x(x) - v.c(mean)) * t);
    set_tangent(mean, t_mean.to(mean.scalar_type()));
    set_tangent(m2, t_m2.to(m2.scalar_type()));
  }
  return result;
}

// batch_norm_elemt: y = (x - mean) * invstd * w + b. Edges: input, weight, bias, mean, invstd.
struct BatchNormElemtBackward : public Node {
  SavedVariable input_, weight_, mean_, invstd_;
  std::optional<at::ScalarType> bias_dtype;

  variable_list apply(variable_list&& grads) override {
    variable_list out(5);
    const Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const Tensor input = input_.unpack(), weight = weight_.unpack(), mean = mean_.unpack(), invstd = invstd_.unpack();
    const ChannelView v(input, mean.scalar_type());
    const Tensor g = v.x(grad), s = v.c(invstd);
    const Tensor w = weight.defined() ? v.c(weight) : Tensor();
    const Tensor gw = w.defined() ? g * w : g;
    const auto xmu = [&] { return v.x(input) - v.c(mean); };
    if (task_should_compute_output(0)) out[0] = ChannelView::back(gw * s, input);
    if (task_should_compute_output(1)) out[1] = v.sum(g * xmu() * s).to(weight.scalar_type());
    if (task_should_compute_output(2)) out[2] = v.sum(g).to(*bias_dtype);
    if (task_should_compute_output(3)) out[3] = -v.sum(gw * s).to(mean.scalar_type());
    if (task_should_compute_output(4)) out[4] = v.sum(gw * xmu()).to(invstd.scalar_type());
    return out;
  }
  std::string name() const override { return "CnnopsBatchNormElemtBackward"; }
  void release_variables() override {
    input_.reset_data();
    weight_.reset_data();
    mean_.reset_data();
    invstd_.reset_data();
  }
};

Tensor batch_norm_elemt_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                 const Tensor& mean, const Tensor& invstd) {
  const Tensor w = value(weight), b = value(bias);
  auto node = make_node<BatchNormElemtBackward>(input, weight, bias, mean, invstd);
  Tensor out = [&] {
    BelowAutograd guard;
    return call::batch_norm_elemt(input, weight, bias, mean, invstd);
  }();
  if (node) {
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(w, false);
    node->mean_ = SavedVariable(mean, false);
    node->invstd_ = SavedVariable(invstd, false);
    if (b.defined()) node->bias_dtype = b.scalar_type();
    torch::autograd::set_history(out, node);
  }
  // dy = w ((dx - dmean) invstd + (x - mean) dinvstd) + dw (x - mean) invstd + db
  const Tensor tx = tangent(input), tw = tangent(w), tb = tangent(b), tm = tangent(mean), ts = tangent(invstd);
  if (tx.defined() || tw.defined() || tb.defined() || tm.defined() || ts.defined()) {
    const Tensor x = primal(input), mean_p = primal(mean);
    const ChannelView v(x, mean.scalar_type());
    const Tensor s = v.c(primal(invstd)), xmu = v.x(x) - v.c(mean_p);
    Tensor t;
    if (tx.defined()) t = v.x(tx) * s;
    if (tm.defined()) t = add_defined(t, -(v.c(tm) * s));
    if (ts.defined()) t = add_defined(t, xmu * v.c(ts));
    if (t.defined() && w.defined()) t = t * v.c(primal(w));
    if (tw.defined()) t = add_defined(t, xmu * s * v.c(tw));
    if (tb.defined()) t = t.defined() ? t + v.c(tb) : v.c(tb).expand({v.N, v.C, v.S});
    set_tangent(out, ChannelView::back(t, out));
  }
  return out;
}

// batch_norm_backward_elemt: gI = k (gO - sum_dy / n - (x - mean) invstd^2 sum_dy_xmu / n), with
// k = w invstd (the sums' terms vanish for count = 0). Edges: grad_output, input, mean, invstd,
// weight, sum_dy, sum_dy_xmu.
struct BatchNormBackwardElemtBackward : public Node {
  SavedVariable grad_output_, input_, mean_, invstd_, weight_, sum_dy_, sum_dy_xmu_;
  int64_t count = 0;

  variable_list apply(variable_list&& grads) override {
    variable_list out(7);
    const Tensor& u_in = grads[0];
    if (!u_in.defined()) return out;
    const Tensor input = input_.unpack(), mean = mean_.unpack(), invstd = invstd_.unpack(), weight = weight_.unpack();
    const Tensor grad_output = grad_output_.unpack(), sum_dy = sum_dy_.unpack(), sum_dy_xmu = sum_dy_xmu_.unpack();
    const ChannelView v(input, mean.scalar_type());
    const double inv_n = count > 0 ? 1.0 / static_cast<double>(count) : 0.0;
    const Tensor u = v.x(u_in), s = v.c(invstd), s2 = s * s, sd = v.c(sum_dy) * inv_n, sdx = v.c(sum_dy_xmu) * inv_n;
    const Tensor w = weight.defined() ? v.c(weight) : Tensor();
    const Tensor uw = w.defined() ? u * w : u;
    const Tensor uk = uw * s;
    const auto xmu = [&] { return v.x(input) - v.c(mean); };
    const auto gO = [&] { return v.x(grad_output); };
    if (task_should_compute_output(0)) out[0] = ChannelView::back(uk, grad_output);
    if (task_should_compute_output(1)) out[1] = ChannelView::back(-(uk * s2 * sdx), input);
    if (task_should_compute_output(2)) out[2] = v.sum(uk * s2 * sdx).to(mean.scalar_type());
    if (task_should_compute_output(3)) out[3] = v.sum(uw * (gO() - sd - 3 * s2 * xmu() * sdx)).to(invstd.scalar_type());
    if (task_should_compute_output(4)) out[4] = v.sum(u * s * (gO() - sd - s2 * xmu() * sdx)).to(weight.scalar_type());
    if (task_should_compute_output(5)) out[5] = (-v.sum(uk) * inv_n).to(sum_dy.scalar_type());
    if (task_should_compute_output(6)) out[6] = (-v.sum(uk * xmu() * s2) * inv_n).to(sum_dy_xmu.scalar_type());
    return out;
  }
  std::string name() const override { return "CnnopsBatchNormBackwardElemtBackward"; }
  void release_variables() override {
    for (SavedVariable* t : {&grad_output_, &input_, &mean_, &invstd_, &weight_, &sum_dy_, &sum_dy_xmu_})
      t->reset_data();
  }
};

Tensor batch_norm_backward_elemt_autograd(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                          const Tensor& invstd, const OptTensor& weight, const Tensor& sum_dy,
                                          const Tensor& sum_dy_xmu, int64_t count) {
  const Tensor w = value(weight);
  auto node = make_node<BatchNormBackwardElemtBackward>(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu);
  Tensor out = [&] {
    BelowAutograd guard;
    return call::batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  }();
  if (node) {
    node->grad_output_ = SavedVariable(grad_output, false);
    node->input_ = SavedVariable(input, false);
    node->mean_ = SavedVariable(mean, false);
    node->invstd_ = SavedVariable(invstd, false);
    node->weight_ = SavedVariable(w, false);
    node->sum_dy_ = SavedVariable(sum_dy, false);
    node->sum_dy_xmu_ = SavedVariable(sum_dy_xmu, false);
    node->count = count;
    torch::autograd::set_history(out, node);
  }
  const Tensor t_gO = tangent(grad_output), tx = tangent(input), tm = tangent(mean), ts = tangent(invstd),
               tw = tangent(w), t_sd = tangent(sum_dy), t_sdx = tangent(sum_dy_xmu);
  if (t_gO.defined() || tx.defined() || tm.defined() || ts.defined() || tw.defined() || t_sd.defined() ||
      t_sdx.defined()) {
    const Tensor x = primal(input), mean_p = primal(mean);
    const ChannelView v(x, mean.scalar_type());
    const double inv_n = count > 0 ? 1.0 / static_cast<double>(count) : 0.0;
    const Tensor s = v.c(primal(invstd)), s2 = s * s, xmu = v.x(x) - v.c(mean_p);
    const Tensor sd = v.c(primal(sum_dy)) * inv_n, sdx = v.c(primal(sum_dy_xmu)) * inv_n;
    const Tensor gO = v.x(primal(grad_output));
    // The tangent of r = gO - sd - (x - mean) invstd^2 sdx at fixed invstd, times invstd;
    // then the invstd and weight terms. gI = w invstd r.
    Tensor t;
    if (t_gO.defined()) t = v.x(t_gO);
    if (t_sd.defined()) t = add_defined(t, -(v.c(t_sd) * inv_n));
    if (tx.defined()) t = add_defined(t, -(v.x(tx) * s2 * sdx));
    if (tm.defined()) t = add_defined(t, v.c(tm) * s2 * sdx);
    if (t_sdx.defined()) t = add_defined(t, -(xmu * s2 * v.c(t_sdx) * inv_n));
    if (t.defined()) t = t * s;
    if (ts.defined()) t = add_defined(t, v.c(ts) * (gO - sd - 3 * s2 * xmu * sdx));
    if (t.defined() && w.defined()) t = t * v.c(primal(w));
    if (tw.defined()) t = add_defined(t, v.c(tw) * s * (gO - sd - s2 * xmu * sdx));
    set_tangent(out, ChannelView::back(t.expand({v.N, v.C, v.S}), out));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnops, Autograd, m) {
  m.impl("batch_norm_forward", TORCH_FN(batch_norm_forward_autograd));
  m.impl("batch_norm_backward", TORCH_FN(batch_norm_backward_autograd));
  m.impl("layer_norm_forward", TORCH_FN(layer_norm_forward_autograd));
  m.impl("layer_norm_backward", TORCH_FN(layer_norm_backward_autograd));
  m.impl("group_norm_forward", TORCH_FN(group_norm_forward_autograd));
  m.impl("group_norm_backward", TORCH_FN(group_norm_backward_autograd));
  m.impl("batch_norm_stats", TORCH_FN(batch_norm_stats_autograd));
  m.impl("batch_norm_elemt", TORCH_FN(batch_norm_elemt_autograd));
  m.impl("batch_norm_backward_elemt", TORCH_FN(batch_norm_backward_elemt_autograd));
}

}  // namespace cnnops::autograd
