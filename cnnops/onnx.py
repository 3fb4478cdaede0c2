"""ONNX export of models that use cnnops: a standard ONNX graph, no cnnops domain.

Every cnnops forward op computes what one torch op computes (its "twin": cnnops::conv_forward is
aten::convolution, cnnops::max_pool_forward is aten::max_pool2d_with_indices, ...), so an exported
graph is the graph of the twin, which torch's exporters already translate to standard ONNX.

- torch.onnx.export(..., dynamo=True) runs torch.export with the ONNX export flag set; while it is
  set, cnnops.functional calls the twins instead of the cnnops ops (`ops` below), so the exported
  program holds aten ops (as for the torch.nn model), not cnnops ones. No public hook translates
  the cnnops ops themselves in every export: the exporter builds its registry per call, and
  batch_norm_forward, whose schema mutates the running statistics, reaches it as a higher-order
  auto_functionalized_v2 node. translation_table() serves a model that calls the ops itself, through
  the exporter's per-call custom_translation_table.
- torch.onnx.export(..., dynamo=False) traces with torch.jit.trace, which records the cnnops ops
  as they are called (also by a user calling torch.ops.cnnops.* directly); the symbolic functions
  registered here (torch.onnx.register_custom_op_symbolic) map each one to torch's own symbolic
  function for its twin, or to standard ONNX ops where torch has none.

What ONNX cannot express raises NotImplementedError while exporting, never a wrong graph: adaptive
max pool with windows of different sizes, and the shape-dependent cases (adaptive pools, avg pool
with divisor_override, which torch's exporters drop) without static spatial sizes.
"""
import torch
import torch.nn.functional as F

from ._ops import CONV_ACTIVATIONS, pool_output_size

__all__ = ["exporting", "ops", "translation_table", "twin"]

try:  # the flags torch.onnx.is_in_onnx_export() reads, without its per-call imports (microseconds), read as
    # plain attributes: torch.compile cannot trace the property GLOBALS.in_onnx_export (torch.onnx is skipped)
    from torch.onnx._internal.exporter import _flags as _dynamo_flags
    from torch.onnx._internal.torchscript_exporter._globals import (
        GLOBALS as _ts_globals,
    )

    _ts_globals._in_onnx_export  # noqa: B018  (fails here, not per call, if torch renames it)

    def exporting():
        """Whether torch.onnx.export (either exporter) is running: torch.onnx.is_in_onnx_export()."""
        return _dynamo_flags._is_onnx_exporting or _ts_globals._in_onnx_export
except (ImportError, AttributeError):  # pragma: no cover - another torch layout
    exporting = torch.onnx.is_in_onnx_export


def _divisor_override_end_pads(sizes, kernel_size, stride, padding, ceil_mode):
    """avg pool with divisor_override d is sum / d over each window, clipped to the input. Padded
    with zeros on the right until torch's last window fits, every window is whole, so an
    AveragePool counting the padding (no ceil_mode) is sum / prod(kernel_size): out = that *
    prod(kernel_size) / d. These right pads; they need static spatial sizes."""
    if not all(isinstance(s, int) for s in sizes):
        raise NotImplementedError("cnnops ONNX export: avg pool with divisor_override needs static spatial input "
                                  f"sizes (the windows depend on them), but got {list(sizes)}")
    return [max((pool_output_size(size, k, s, p, 1, ceil_mode) - 1) * s + k - size - p, 0)
            for size, k, s, p in zip(sizes, kernel_size, stride, padding)]


def _kernel_numel(kernel_size):
    n = 1
    for k in kernel_size:
        n *= k
    return n


# --------------------------------------------------------------------------------------------
# Twins: each cnnops forward op as torch ops, same arguments and same outputs (shapes, dtypes).
# --------------------------------------------------------------------------------------------


def _conv_forward(input, weight, bias, stride, padding, dilation, groups, activation="none"):
    torch._check(activation in CONV_ACTIVATIONS,
                 lambda: f"activation: expected one of 'none', 'relu', but got activation='{activation}'")
    out = torch.convolution(input, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)
    return torch.relu(out) if activation == "relu" else out


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_ADAPTIVE_MAX_POOL = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def _max_pool_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    return _MAX_POOL[len(kernel_size)](input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def _avg_pool_forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    if divisor_override:  # torch's exporters drop divisor_override; ONNX's AveragePool has none
        end = _divisor_override_end_pads(list(input.shape[2:]), kernel_size, stride, padding, ceil_mode)
        pads = [v for p, e in zip(reversed(padding), reversed(end)) for v in (p, e)]  # F.pad: last dim first
        out = _AVG_POOL[len(kernel_size)](F.pad(input, pads), kernel_size, stride)
        return out * (_kernel_numel(kernel_size) / divisor_override)
    return _AVG_POOL[len(kernel_size)](input, kernel_size, stride, padding, ceil_mode, count_include_pad)


def _adaptive_windows(size, out):
    """Adaptive pooling's windows along one dim: [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _uniform_kernel(sizes, output_size):
    """The kernel (= stride) when every adaptive window has one size (the output size divides the
    input's), else None."""
    if all(o > 0 and s % o == 0 for s, o in zip(sizes, output_size)):
        return [s // o for s, o in zip(sizes, output_size)]
    return None


def _averaging_matrix(size, out, dtype):
    """(size, out) matrix whose product with a dim averages each adaptive window (windows of
    different sizes, which ONNX's pools cannot express)."""
    weights = torch.zeros(size, out, dtype=torch.float64)
    for j, (start, end) in enumerate(_adaptive_windows(size, out)):
        weights[start:end, j] = 1.0 / (end - start)
    return weights.to(dtype)


def _adaptive_max_kernel(sizes, output_size):
    kernel = _uniform_kernel(sizes, output_size)
    if kernel is None:
        raise NotImplementedError(
            f"cnnops ONNX export: adaptive max pool to output_size={tuple(output_size)} from spatial size "
            f"{tuple(sizes)}: ONNX has no max over windows of different sizes; use an output size that divides "
            "the input size")
    return kernel


def _static_spatial(input, what):
    sizes = list(input.shape[2:])
    if not all(isinstance(s, int) for s in sizes):
        raise NotImplementedError(f"cnnops ONNX export: {what} needs static spatial input sizes (the windows "
                                  f"depend on them), but got input of size {list(input.shape)}")
    return sizes


def _adaptive_avg_pool_forward(input, output_size):
    # Exported as what ONNX has: a global mean, an AveragePool when every window has one size (the
    # output size divides the input's), and otherwise, per dim, a product with the constant
    # (in, out) matrix averaging each window (torch's own exporters stop at the first two).
    output_size = list(output_size)
    dims = len(output_size)
    if output_size == [1] * dims:
        return input.mean(list(range(2, 2 + dims)), keepdim=True)
    sizes = _static_spatial(input, "adaptive avg pool")
    kernel = _uniform_kernel(sizes, output_size)
    if kernel is not None:
        return _AVG_POOL[dims](input, kernel, kernel)
    out = input
    for d, (size, o) in enumerate(zip(sizes, output_size)):
        weights = _averaging_matrix(size, o, input.dtype).to(input.device)
        out = torch.matmul(out.movedim(2 + d, -1), weights).movedim(-1, 2 + d)
    return out


def _adaptive_max_pool_forward(input, output_size):
    # A MaxPool when every window has one size (a global pool is one window); its indices are the
    # same flat per-plane positions.
    output_size = list(output_size)
    kernel = _adaptive_max_kernel(_static_spatial(input, "adaptive max pool"), output_size)
    return _MAX_POOL[len(kernel)](input, kernel, kernel, 0, 1, False, return_indices=True)


def _max_unpool_forward(input, indices, output_size):
    # The flat per-plane indices scattered into a zero (N, C, prod(output_size)) tensor:
    # torch's max_unpool{2,3}d kernels, and the index_put its decomposition exports to.
    n, c = input.shape[:2]
    plane = 1
    for s in output_size:
        plane *= s
    out = input.new_zeros((n, c, plane))
    out = out.scatter(2, indices.reshape(n, c, -1), input.reshape(n, c, -1))
    return out.reshape(n, c, *output_size)


def _opmath(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps):
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    dtype = _opmath(input.dtype)
    if training:
        var, mean = torch.var_mean(input.to(dtype), [d for d in range(input.dim()) if d != 1], correction=0)
        return out, mean, torch.rsqrt(var + eps)
    return out, running_mean.to(dtype), torch.rsqrt(running_var.to(dtype) + eps)


def _layer_norm_forward(input, normalized_shape, weight, bias, eps):
    out = F.layer_norm(input, list(normalized_shape), weight, bias, eps)
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    var, mean = torch.var_mean(input.to(_opmath(input.dtype)), dims, correction=0)
    return out, mean, torch.rsqrt(var + eps)


def _group_norm_forward(input, weight, bias, num_groups, eps):
    out = F.group_norm(input, num_groups, weight, bias, eps)
    grouped = input.to(_opmath(input.dtype)).reshape(input.size(0), num_groups, -1)
    var, mean = torch.var_mean(grouped, 2, correction=0)
    return out, mean, torch.rsqrt(var + eps)


_TWINS = {
    "conv_forward": _conv_forward,
    "max_pool_forward": _max_pool_forward,
    "avg_pool_forward": _avg_pool_forward,
    "adaptive_avg_pool_forward": _adaptive_avg_pool_forward,
    "adaptive_max_pool_forward": _adaptive_max_pool_forward,
    "max_unpool_forward": _max_unpool_forward,
    "batch_norm_forward": _batch_norm_forward,
    "layer_norm_forward": _layer_norm_forward,
    "group_norm_forward": _group_norm_forward,
}


def twin(name):
    """The torch function computing cnnops::<name>'s outputs from its arguments."""
    return _TWINS[name]


class _Ops:
    """torch.ops.cnnops for cnnops.functional: each forward op calls its twin while torch.onnx.export
    runs (one flag check otherwise; cnnops.functional's eager fast path does not come here)."""

    def __init__(self):
        self._namespace = torch.ops.cnnops
        for name in _TWINS:
            setattr(self, name, self._routed(name))

    def _routed(self, name):
        op, twin_fn = getattr(self._namespace, name), _TWINS[name]

        def call(*args):
            return twin_fn(*args) if exporting() else op(*args)

        call.__name__ = call.__qualname__ = name
        return call

    def __getattr__(self, name):  # the other ops, unchanged
        return getattr(self._namespace, name)


ops = _Ops()


# --------------------------------------------------------------------------------------------
# TorchScript exporter (dynamo=False): symbolic functions for the cnnops ops in a traced graph.
# --------------------------------------------------------------------------------------------
# Arguments arrive as graph Values; torch's symbolic functions for the twins take them as they
# are (their parse_args reads the constants), so pooling and normalization reuse them and only
# what torch has no symbolic for (max unpool, the statistics outputs) is built here.

_SYMBOLIC_OPSET = 11  # ScatterElements (max unpool); torch's own pool symbolics need 10


def _ts():
    from torch.onnx._internal.torchscript_exporter import (
        _type_utils,
        registration,
        symbolic_helper,
    )

    return registration, symbolic_helper, _type_utils


def _torch_symbolic(g, name):
    registration, _, _ = _ts()
    return registration.registry.get_function_group(name).get(g.opset)


def _arg(value, desc):
    _, helper, _ = _ts()
    return helper._parse_arg(value, desc)


def _const(g, values, dtype):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


def _dtype(value):
    _, _, type_utils = _ts()
    return type_utils.JitScalarType.from_value(value).dtype()


def _static_sizes(value, what):
    _, helper, _ = _ts()
    sizes = helper._get_tensor_sizes(value)
    if sizes is None or any(s is None for s in sizes):
        raise NotImplementedError(f"cnnops ONNX export: {what} needs static input sizes, but the traced input has "
                                  f"sizes {sizes}")
    return sizes


def _reduce_mean(g, x, axes):
    if g.opset >= 18:
        return g.op("ReduceMean", x, _const(g, axes, torch.long), keepdims_i=1)
    return g.op("ReduceMean", x, axes_i=axes, keepdims_i=1)


def _invstd(g, var, eps):
    return g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, _const(g, eps, _dtype(var)))))


def _mean_invstd(g, x, axes, eps):
    """Biased statistics over `axes` (kept as size-1 dims): mean, 1 / sqrt(var + eps)."""
    mean = _reduce_mean(g, x, axes)
    centered = g.op("Sub", x, mean)
    return mean, _invstd(g, _reduce_mean(g, g.op("Mul", centered, centered), axes), eps)


def _squeeze(g, x, axes):
    _, helper, _ = _ts()
    return helper._squeeze_helper(g, x, axes)


def _conv_forward_symbolic(g, input, weight, bias, stride, padding, dilation, groups, activation=None):
    activation = "none" if activation is None else _arg(activation, "s")
    if activation not in ("none", "relu"):
        raise NotImplementedError(f"cnnops ONNX export: conv activation={activation!r}")
    padding = _arg(padding, "is")
    inputs = [input, weight] + ([] if _ts()[1]._is_none(bias) else [bias])
    out = g.op("Conv", *inputs, strides_i=_arg(stride, "is"), pads_i=padding + padding,
               dilations_i=_arg(dilation, "is"), group_i=_arg(groups, "i"))
    return g.op("Relu", out) if activation == "relu" else out


def _max_pool_forward_symbolic(g, input, kernel_size, stride, padding, dilation, ceil_mode):
    dims = len(_arg(kernel_size, "is"))
    fn = _torch_symbolic(g, f"aten::max_pool{dims}d_with_indices")
    return fn(g, input, kernel_size, stride, padding, dilation, ceil_mode)


def _avg_pool_forward_symbolic(g, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                               divisor_override):
    dims = len(_arg(kernel_size, "is"))
    fn = _torch_symbolic(g, f"aten::avg_pool{dims}d")
    divisor = _arg(divisor_override, "i")
    if not divisor:
        return fn(g, input, kernel_size, stride, padding, ceil_mode, count_include_pad, None)
    kernel, strides, pads = _arg(kernel_size, "is"), _arg(stride, "is"), _arg(padding, "is")
    end = _divisor_override_end_pads(_static_sizes(input, "avg pool with divisor_override")[2:], kernel, strides, pads,
                                     _arg(ceil_mode, "b"))
    out = g.op("AveragePool", input, kernel_shape_i=kernel, strides_i=strides, pads_i=pads + end,
               count_include_pad_i=1)
    return g.op("Mul", out, _const(g, _kernel_numel(kernel) / divisor, _dtype(input)))


def _adaptive_avg_pool_forward_symbolic(g, input, output_size):
    output_size = _arg(output_size, "is")
    dims = len(output_size)
    if output_size == [1] * dims:
        return g.op("GlobalAveragePool", input)
    sizes = _static_sizes(input, "adaptive avg pool")[2:]
    kernel = _uniform_kernel(sizes, output_size)
    if kernel is not None:
        return g.op("AveragePool", input, kernel_shape_i=kernel, strides_i=kernel, pads_i=[0] * (2 * dims))
    out, rank = input, dims + 2
    for d, (size, o) in enumerate(zip(sizes, output_size)):
        weights = g.op("Constant", value_t=_averaging_matrix(size, o, _dtype(input)))
        perm = list(range(rank))
        perm[2 + d], perm[-1] = perm[-1], perm[2 + d]
        out = g.op("Transpose", g.op("MatMul", g.op("Transpose", out, perm_i=perm), weights), perm_i=perm)
    return out


def _adaptive_max_pool_forward_symbolic(g, input, output_size):
    output_size = _arg(output_size, "is")
    kernel = _adaptive_max_kernel(_static_sizes(input, "adaptive max pool")[2:], output_size)
    fn = _torch_symbolic(g, f"aten::max_pool{len(kernel)}d_with_indices")
    return fn(g, input, kernel, kernel, [0] * len(kernel), [1] * len(kernel), False)


def _max_unpool_forward_symbolic(g, input, indices, output_size):
    # out.view(N, C, -1).scatter_(2, indices.view(N, C, -1), input.view(N, C, -1)), as torch's kernel
    output_size = _arg(output_size, "is")
    plane = 1
    for s in output_size:
        plane *= s
    nc = g.op("Slice", g.op("Shape", input), _const(g, [0], torch.long), _const(g, [2], torch.long))
    flat = g.op("Concat", nc, _const(g, [-1], torch.long), axis_i=0)
    zeros = g.op("ConstantOfShape", g.op("Concat", nc, _const(g, [plane], torch.long), axis_i=0),
                 value_t=torch.zeros(1, dtype=_dtype(input)))
    out = g.op("ScatterElements", zeros, g.op("Reshape", indices, flat), g.op("Reshape", input, flat), axis_i=2)
    return g.op("Reshape", out, g.op("Concat", nc, _const(g, list(output_size), torch.long), axis_i=0))


def _batch_norm_forward_symbolic(g, input, weight, bias, running_mean, running_var, training, momentum, eps):
    training_value, eps_value = _arg(training, "b"), _arg(eps, "f")
    fn = _torch_symbolic(g, "aten::batch_norm")
    out = fn(g, input, weight, bias, running_mean, running_var, training, momentum, eps, None)
    if training_value:
        rank = _ts()[1]._get_tensor_rank(input)
        axes = [0] + list(range(2, rank))
        mean, invstd = _mean_invstd(g, input, axes, eps_value)
        return out, _squeeze(g, mean, axes), _squeeze(g, invstd, axes)
    return out, running_mean, _invstd(g, running_var, eps_value)


def _layer_norm_forward_symbolic(g, input, normalized_shape, weight, bias, eps):
    out, mean, rstd = _torch_symbolic(g, "aten::native_layer_norm")(g, input, normalized_shape, weight, bias, eps)
    rank = _ts()[1]._get_tensor_rank(input)
    axes = list(range(rank - len(_arg(normalized_shape, "is")), rank))
    return out, _squeeze(g, mean, axes), _squeeze(g, rstd, axes)


def _group_norm_forward_symbolic(g, input, weight, bias, num_groups, eps):
    groups, eps_value = _arg(num_groups, "i"), _arg(eps, "f")
    out = _torch_symbolic(g, "aten::group_norm")(g, input, num_groups, weight, bias, eps, None)
    grouped = g.op("Reshape", input, _const(g, [0, groups, -1], torch.long))
    mean, invstd = _mean_invstd(g, grouped, [2], eps_value)
    return out, _squeeze(g, mean, [2]), _squeeze(g, invstd, [2])


_SYMBOLICS = {
    "conv_forward": _conv_forward_symbolic,
    "max_pool_forward": _max_pool_forward_symbolic,
    "avg_pool_forward": _avg_pool_forward_symbolic,
    "adaptive_avg_pool_forward": _adaptive_avg_pool_forward_symbolic,
    "adaptive_max_pool_forward": _adaptive_max_pool_forward_symbolic,
    "max_unpool_forward": _max_unpool_forward_symbolic,
    "batch_norm_forward": _batch_norm_forward_symbolic,
    "layer_norm_forward": _layer_norm_forward_symbolic,
    "group_norm_forward": _group_norm_forward_symbolic,
}

for _name, _fn in _SYMBOLICS.items():
    torch.onnx.register_custom_op_symbolic(f"cnnops::{_name}", _fn, _SYMBOLIC_OPSET)


# --------------------------------------------------------------------------------------------
# Dynamo exporter, raw ops: a translation table for a model that calls torch.ops.cnnops itself.
# --------------------------------------------------------------------------------------------


def translation_table():
    """{cnnops op: ONNX translation} for `torch.onnx.export(..., dynamo=True,
    custom_translation_table=cnnops.onnx.translation_table())`, for a model that calls
    torch.ops.cnnops.* itself (through cnnops.functional and cnnops.nn no table is needed).

    batch_norm_forward is not in it: its schema mutates the running statistics, so the exporter
    sees it as a higher_order.auto_functionalized_v2 node, which no table entry can match; call
    cnnops.functional.batch_norm, or export with dynamo=False.
    """
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops import core as tl_core
    from onnxscript.function_libs.torch_lib.ops import nn as tl_nn

    max_pool = {1: tl_nn.aten_max_pool1d_with_indices, 2: tl_nn.aten_max_pool2d_with_indices,
                3: tl_nn.aten_max_pool3d_with_indices}

    def static_spatial(input, what):
        sizes = list(input.shape)[2:]
        if not all(isinstance(s, int) for s in sizes):
            raise NotImplementedError(f"cnnops ONNX export: {what} needs static spatial input sizes, but got {sizes}")
        return sizes

    def ints(values):
        return op.Constant(value_ints=list(values))

    def conv_forward(input, weight, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups: int = 1,
                     activation: str = "none"):
        if activation not in ("none", "relu"):
            raise NotImplementedError(f"cnnops ONNX export: conv activation={activation!r}")
        out = tl_core.aten_convolution(input, weight, bias, stride, padding, dilation, False, [0] * len(stride),
                                       groups)
        return op.Relu(out) if activation == "relu" else out

    def max_pool_forward(input, kernel_size, stride, padding, dilation, ceil_mode: bool = False):
        return max_pool[len(kernel_size)](input, kernel_size, stride, padding, dilation, ceil_mode)

    def avg_pool_forward(input, kernel_size, stride, padding, ceil_mode: bool = False, count_include_pad: bool = True,
                         divisor_override: int = 0):
        if not divisor_override:
            return op.AveragePool(input, kernel_shape=list(kernel_size), strides=list(stride),
                                  pads=list(padding) * 2, ceil_mode=int(ceil_mode),
                                  count_include_pad=int(count_include_pad))
        end = _divisor_override_end_pads(list(input.shape)[2:], kernel_size, stride, padding, ceil_mode)
        out = op.AveragePool(input, kernel_shape=list(kernel_size), strides=list(stride),
                             pads=list(padding) + end, count_include_pad=1)
        return op.Mul(out, op.CastLike(op.Constant(value_float=_kernel_numel(kernel_size) / divisor_override), input))

    def adaptive_avg_pool_forward(input, output_size):
        output_size = list(output_size)
        dims = len(output_size)
        if output_size == [1] * dims:
            return op.GlobalAveragePool(input)
        sizes = static_spatial(input, "adaptive avg pool")
        kernel = _uniform_kernel(sizes, output_size)
        if kernel is not None:
            return op.AveragePool(input, kernel_shape=kernel, strides=kernel, pads=[0] * (2 * dims))
        out, rank = input, dims + 2
        for d, (size, o) in enumerate(zip(sizes, output_size)):
            perm = list(range(rank))
            perm[2 + d], perm[-1] = perm[-1], perm[2 + d]
            weights = _averaging_matrix(size, o, torch.float64).numpy()
            matrix = op.CastLike(op.Constant(value=ir.tensor(weights)), input)
            out = op.Transpose(op.MatMul(op.Transpose(out, perm=perm), matrix), perm=perm)
        return out

    def adaptive_max_pool_forward(input, output_size):
        output_size = list(output_size)
        kernel = _adaptive_max_kernel(static_spatial(input, "adaptive max pool"), output_size)
        return max_pool[len(kernel)](input, kernel, kernel, [0] * len(kernel), [1] * len(kernel), False)

    def max_unpool_forward(input, indices, output_size):
        plane = 1
        for s in output_size:
            plane *= s
        nc = op.Shape(input, start=0, end=2)
        flat = op.Concat(nc, ints([-1]), axis=0)
        zeros = op.CastLike(op.ConstantOfShape(op.Concat(nc, ints([plane]), axis=0)), input)
        out = op.ScatterElements(zeros, op.Reshape(indices, flat), op.Reshape(input, flat), axis=2)
        return op.Reshape(out, op.Concat(nc, ints(output_size), axis=0))

    def mean_invstd(x, axes, eps):
        mean = op.ReduceMean(x, ints(axes), keepdims=1)
        centered = op.Sub(x, mean)
        var = op.ReduceMean(op.Mul(centered, centered), ints(axes), keepdims=1)
        return mean, op.Reciprocal(op.Sqrt(op.Add(var, op.CastLike(op.Constant(value_float=eps), x))))

    def layer_norm_forward(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
        rank = len(input.shape)
        axes = list(range(rank - len(normalized_shape), rank))
        if weight is None:
            weight = op.CastLike(op.Expand(op.Constant(value_floats=[1.0]), ints(normalized_shape)), input)
        out, mean, invstd = op.LayerNormalization(input, weight, bias, axis=axes[0], epsilon=eps)
        return out, op.Squeeze(mean, ints(axes)), op.Squeeze(invstd, ints(axes))

    def group_norm_forward(input, weight=None, bias=None, num_groups: int = 1, eps: float = 1e-5):
        rank = len(input.shape)
        grouped = op.Reshape(input, ints([0, num_groups, -1]))
        mean, invstd = mean_invstd(grouped, [2], eps)
        out = op.Reshape(op.Mul(op.Sub(grouped, mean), invstd), op.Shape(input))
        channel_shape = ints([-1] + [1] * (rank - 2))  # per-channel affine, broadcast over N and *
        if weight is not None:
            out = op.Mul(out, op.Reshape(weight, channel_shape))
        if bias is not None:
            out = op.Add(out, op.Reshape(bias, channel_shape))
        return out, op.Squeeze(mean, ints([2])), op.Squeeze(invstd, ints([2]))

    cops = torch.ops.cnnops
    return {
        cops.conv_forward.default: conv_forward,
        cops.max_pool_forward.default: max_pool_forward,
        cops.avg_pool_forward.default: avg_pool_forward,
        cops.adaptive_avg_pool_forward.default: adaptive_avg_pool_forward,
        cops.adaptive_max_pool_forward.default: adaptive_max_pool_forward,
        cops.max_unpool_forward.default: max_unpool_forward,
        cops.layer_norm_forward.default: layer_norm_forward,
        cops.group_norm_forward.default: group_norm_forward,
    }
