"""Loads the compiled kernels (cnnops._C) and registers a fake implementation for every op,
so torch.compile and opcheck can trace them without running a kernel."""
import torch
from torch._prims_common import suggest_memory_format

try:
    from . import _C  # noqa: F401  (registers torch.ops.cnnops.*)
except ImportError as e:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "cnnops._C, the compiled extension, is not built. Build it from the repository root "
        "with `make install` (or `pip install --no-build-isolation -e .`). "
        f"Original error: {e}"
    ) from e

ops = torch.ops.cnnops

_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function


def fast_call_ok(*tensors):
    """Whether cnnops._C.call (csrc/python/fast_call.cpp: no torch.ops argument matching, several
    microseconds less per call) may run the op: in eager mode. torch.compile traces torch.ops
    calls, not C functions, and __torch_function__ overrides (FX proxies, tensor subclasses,
    TorchFunctionModes) are handled by torch.ops."""
    return not _is_compiling() and not _has_torch_function(tensors)


call = _C.call


def conv_output_size(size, kernel, stride, padding, dilation):
    """docs/formulas.md §Conv output size: O = (I + 2P - D(K - 1) - 1) // S + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_memory_format(input, weight):
    """The C++ kernels' rule (as torch's): channels_last out if input or weight suggests it."""
    if input.dim() not in (4, 5):
        return torch.contiguous_format
    channels_last = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    if channels_last in (suggest_memory_format(input), suggest_memory_format(weight)):
        return channels_last
    return torch.contiguous_format


CONV_ACTIVATIONS = ("none", "relu")  # conv_forward's activation argument (csrc/common/activation.h)


@torch.library.register_fake("cnnops::conv_forward")
def _conv_forward_fake(input, weight, bias, stride, padding, dilation, groups, activation="none"):
    torch._check(
        activation in CONV_ACTIVATIONS,
        lambda: f"activation: expected one of 'none', 'relu', but got activation='{activation}'",
    )
    dims = weight.dim() - 2
    torch._check(input.dim() == dims + 2, lambda: f"input: expected {dims + 2}D input, got {input.dim()}D")
    torch._check(input.size(1) == weight.size(1) * groups, lambda: "input channels do not match weight")
    torch._check_not_implemented(input.size(1) > 0,
                                 lambda: "conv_forward(): an input with zero channels is not supported")
    spatial = [
        conv_output_size(input.size(2 + i), weight.size(2 + i), stride[i], padding[i], dilation[i])
        for i in range(dims)
    ]
    out = input.new_empty([input.size(0), weight.size(0), *spatial])
    return out.contiguous(memory_format=_conv_memory_format(input, weight))


@torch.library.register_fake("cnnops::conv_backward")
def _conv_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    def empty():
        return input.new_empty([0])

    grad_input = (input.new_empty(input.shape).contiguous(memory_format=_conv_memory_format(input, input))
                  if output_mask[0] else empty())
    grad_weight = (weight.new_empty(weight.shape).contiguous(memory_format=_conv_memory_format(input, weight))
                   if output_mask[1] else empty())
    grad_bias = input.new_empty([weight.size(0)]) if output_mask[2] else empty()
    return grad_input, grad_weight, grad_bias


# torch.vmap of the convolution ops (torch.func's per-sample gradients, jacrev, hessian), so
# vmap does not run one convolution per vmapped sample. Vmapped inputs alone are more samples
# of one batch; otherwise the B vmapped problems become one convolution with B times the
# groups: channels (N, B * C) of the input, filters (B * C_out, ...) of the weight.


def _vmapped(t, bdim, size):
    """t with its vmap dim first (expanded to `size` where t is not vmapped)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def _fold_groups(x, size):
    """(B, N, C, *s) -> (N, B * C, *s): the vmapped problems side by side as groups."""
    return x.movedim(0, 1).flatten(1, 2)


def _unfold_groups(y, size):
    """(N, B * C, *s) -> (B, N, C, *s)."""
    return y.unflatten(1, (size, -1)).movedim(1, 0)


@torch.library.register_vmap("cnnops::conv_forward")
def _conv_forward_vmap(info, in_dims, input, weight, bias, stride, padding, dilation, groups, activation="none"):
    size = info.batch_size
    x_dim, w_dim, b_dim = in_dims[:3]
    if w_dim is None and b_dim is None:
        x = input.movedim(x_dim, 0)
        out = ops.conv_forward(x.flatten(0, 1), weight, bias, stride, padding, dilation, groups, activation)
        return out.unflatten(0, (size, -1)), 0
    x = _fold_groups(_vmapped(input, x_dim, size), size)
    w = _vmapped(weight, w_dim, size).flatten(0, 1)
    b = None if bias is None else _vmapped(bias, b_dim, size).flatten(0, 1)
    out = ops.conv_forward(x, w, b, stride, padding, dilation, groups * size, activation)
    return _unfold_groups(out, size), 0


@torch.library.register_vmap("cnnops::conv_backward")
def _conv_backward_vmap(info, in_dims, grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    size = info.batch_size
    dy_dim, x_dim, w_dim = in_dims[:3]
    dy = _fold_groups(_vmapped(grad_output, dy_dim, size), size)
    x = _fold_groups(_vmapped(input, x_dim, size), size)
    w = _vmapped(weight, w_dim, size).flatten(0, 1)
    dx, dw, db = ops.conv_backward(dy, x, w, stride, padding, dilation, groups * size, output_mask)
    # Left-out gradients stay unbatched empty placeholders.
    return ((_unfold_groups(dx, size) if output_mask[0] else dx,
             dw.unflatten(0, (size, -1)) if output_mask[1] else dw,
             db.unflatten(0, (size, -1)) if output_mask[2] else db),
            (0 if output_mask[0] else None, 0 if output_mask[1] else None, 0 if output_mask[2] else None))


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------
# Inputs are batched (N x C x *spatial); len(kernel_size) or len(output_size) gives the spatial
# dims. Outputs, indices and gradients keep the input's suggested memory format, as the kernels
# do (csrc/common/pool_checks.h: pool_memory_format).


def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode):
    """formulas.md §Pool output size: O = (I + 2P - D(K-1) - 1) / S + 1, rounded up with ceil_mode; a ceil_mode window
    that would start in the right padding is dropped (torch's rule, csrc/common/pool_shape.h)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out = out - 1
    return out


def _kept_memory_format(input):
    """Pooling and batch/group/instance norm keep the input's layout: channels_last in,
    channels_last out."""
    return suggest_memory_format(input) if input.dim() in (4, 5) else torch.contiguous_format


def _pool_empty(input, shape, dtype=None):
    return torch.empty(shape, dtype=dtype or input.dtype, device=input.device,
                       memory_format=_kept_memory_format(input))


def _check_pool_input_rank(op, input, dims):
    torch._check(input.dim() == dims + 2,
                 lambda: f"{op}(): expected a {dims + 2}D (batched) input, but got input of size {list(input.shape)}")


@torch.library.register_fake("cnnops::max_pool_forward")
def _max_pool_forward_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    dims = len(kernel_size)
    _check_pool_input_rank("max_pool_forward", input, dims)
    spatial = [pool_output_size(input.size(2 + i), kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
               for i in range(dims)]
    shape = [input.size(0), input.size(1), *spatial]
    return _pool_empty(input, shape), _pool_empty(input, shape, torch.int64)


@torch.library.register_fake("cnnops::max_pool_backward")
def _max_pool_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    return _pool_empty(input, input.shape)


@torch.library.register_fake("cnnops::avg_pool_forward")
def _avg_pool_forward_fake(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    dims = len(kernel_size)
    _check_pool_input_rank("avg_pool_forward", input, dims)
    spatial = [pool_output_size(input.size(2 + i), kernel_size[i], stride[i], padding[i], 1, ceil_mode)
               for i in range(dims)]
    return _pool_empty(input, [input.size(0), input.size(1), *spatial])


@torch.library.register_fake("cnnops::avg_pool_backward")
def _avg_pool_backward_fake(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override):
    return _pool_empty(input, input.shape)


@torch.library.register_fake("cnnops::adaptive_avg_pool_forward")
def _adaptive_avg_pool_forward_fake(input, output_size):
    _check_pool_input_rank("adaptive_avg_pool_forward", input, len(output_size))
    return _pool_empty(input, [input.size(0), input.size(1), *output_size])


@torch.library.register_fake("cnnops::adaptive_avg_pool_backward")
def _adaptive_avg_pool_backward_fake(grad_output, input):
    return _pool_empty(input, input.shape)


@torch.library.register_fake("cnnops::adaptive_max_pool_forward")
def _adaptive_max_pool_forward_fake(input, output_size):
    _check_pool_input_rank("adaptive_max_pool_forward", input, len(output_size))
    shape = [input.size(0), input.size(1), *output_size]
    return _pool_empty(input, shape), _pool_empty(input, shape, torch.int64)


@torch.library.register_fake("cnnops::adaptive_max_pool_backward")
def _adaptive_max_pool_backward_fake(grad_output, input, indices):
    return _pool_empty(input, input.shape)


@torch.library.register_fake("cnnops::max_unpool_forward")
def _max_unpool_forward_fake(input, indices, output_size):
    _check_pool_input_rank("max_unpool_forward", input, len(output_size))
    return _pool_empty(input, [input.size(0), input.size(1), *output_size])


@torch.library.register_fake("cnnops::max_unpool_backward")
def _max_unpool_backward_fake(grad_output, input, indices):
    return _pool_empty(input, input.shape)


# ============================================================================================
# Normalization
# ============================================================================================
# Every forward returns (output, mean, invstd). The statistics are kept in the input's opmath
# dtype (float for bfloat16/half, as at::opmath_type) so a half input does not lose them to
# rounding; their shapes are batch norm (C,), group norm (N, num_groups), layer norm the
# input's leading (un-normalized) shape. The fakes check what the kernels check, so a traced
# program fails where the eager one would.


def _opmath_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_per_channel(tensor, name, channels):
    if tensor is not None:
        torch._check(
            tensor.numel() == channels,
            lambda: f"{name}: expected {channels} elements (one per channel), got {tensor.numel()}",
        )


@torch.library.register_fake("cnnops::batch_norm_forward")
def _batch_norm_forward_fake(input, weight, bias, running_mean, running_var, training, momentum, eps):
    # The real kernel updates running_mean/running_var in place when training; the fake only
    # describes the outputs (tracing records the mutation from the schema's Tensor(a!)).
    torch._check(input.dim() >= 2, lambda: f"input: expected at least 2 dims (N, C, *), got {input.dim()}D")
    channels = input.size(1)
    for tensor, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                         (running_var, "running_var")):
        _check_per_channel(tensor, name, channels)
    if not training:
        torch._check(running_mean is not None and running_var is not None,
                     lambda: "running_mean and running_var must be given when training=False")
    out = torch.empty_like(input, memory_format=_kept_memory_format(input))
    stats = input.new_empty([channels], dtype=_opmath_dtype(input.dtype))
    return out, stats, torch.empty_like(stats)


def _norm_backward_grads(input, grad_input_format, param_shape, param_dtype, output_mask):
    def empty():
        return input.new_empty([0])

    grad_input = torch.empty_like(input, memory_format=grad_input_format) if output_mask[0] else empty()
    grad_weight = input.new_empty(param_shape, dtype=param_dtype) if output_mask[1] else empty()
    grad_bias = input.new_empty(param_shape, dtype=param_dtype) if output_mask[2] else empty()
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("cnnops::batch_norm_backward")
def _batch_norm_backward_fake(grad_output, input, weight, mean, invstd, training, output_mask):
    torch._check(input.dim() >= 2, lambda: f"input: expected at least 2 dims (N, C, *), got {input.dim()}D")
    torch._check(grad_output.shape == input.shape, lambda: "grad_output: expected the input's shape")
    channels = input.size(1)
    for tensor, name in ((weight, "weight"), (mean, "mean"), (invstd, "invstd")):
        _check_per_channel(tensor, name, channels)
    param_dtype = weight.dtype if weight is not None else input.dtype
    return _norm_backward_grads(input, _kept_memory_format(input), [channels], param_dtype, output_mask)


def _layer_norm_axis(input, normalized_shape):
    axis = input.dim() - len(normalized_shape)
    torch._check(len(normalized_shape) >= 1, lambda: "normalized_shape: expected at least one dim")
    torch._check(
        axis >= 0 and list(input.shape[axis:]) == list(normalized_shape),
        lambda: f"normalized_shape={list(normalized_shape)} does not match the input's trailing dims "
                f"(input of size {list(input.shape)})",
    )
    return axis


@torch.library.register_fake("cnnops::layer_norm_forward")
def _layer_norm_forward_fake(input, normalized_shape, weight, bias, eps):
    axis = _layer_norm_axis(input, normalized_shape)
    for tensor, name in ((weight, "weight"), (bias, "bias")):
        if tensor is not None:
            torch._check(list(tensor.shape) == list(normalized_shape),
                         lambda: f"{name}: expected shape {list(normalized_shape)}, got {list(tensor.shape)}")
    # Layer norm reduces over the trailing dims, so (like torch) its output is contiguous.
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    stats = input.new_empty(input.shape[:axis], dtype=_opmath_dtype(input.dtype))
    return out, stats, torch.empty_like(stats)


@torch.library.register_fake("cnnops::layer_norm_backward")
def _layer_norm_backward_fake(grad_output, input, normalized_shape, mean, invstd, weight, output_mask):
    _layer_norm_axis(input, normalized_shape)
    torch._check(grad_output.shape == input.shape, lambda: "grad_output: expected the input's shape")
    param_dtype = weight.dtype if weight is not None else input.dtype
    return _norm_backward_grads(input, torch.contiguous_format, list(normalized_shape), param_dtype, output_mask)


def _check_group_norm(input, weight, num_groups):
    torch._check(input.dim() >= 2, lambda: f"input: expected at least 2 dims (N, C, *), got {input.dim()}D")
    channels = input.size(1)
    torch._check(num_groups > 0 and channels % num_groups == 0,
                 lambda: f"num_groups={num_groups} must be positive and divide the {channels} channels")
    _check_per_channel(weight, "weight", channels)
    return channels


@torch.library.register_fake("cnnops::group_norm_forward")
def _group_norm_forward_fake(input, weight, bias, num_groups, eps):
    _check_group_norm(input, weight, num_groups)
    _check_per_channel(bias, "bias", input.size(1))
    out = torch.empty_like(input, memory_format=_kept_memory_format(input))
    stats = input.new_empty([input.size(0), num_groups], dtype=_opmath_dtype(input.dtype))
    return out, stats, torch.empty_like(stats)


@torch.library.register_fake("cnnops::group_norm_backward")
def _group_norm_backward_fake(grad_output, input, mean, invstd, weight, num_groups, output_mask):
    channels = _check_group_norm(input, weight, num_groups)
    torch._check(grad_output.shape == input.shape, lambda: "grad_output: expected the input's shape")
    param_dtype = weight.dtype if weight is not None else input.dtype
    return _norm_backward_grads(input, _kept_memory_format(input), [channels], param_dtype, output_mask)



# torch.vmap (and so torch.func's per-sample gradients, jacrev, hessian) of batch_norm_forward:
# its schema mutates the running statistics, which vmap's generic per-sample loop refuses. The
# other norm ops run in that loop. This rule costs nothing outside vmap.
@torch.library.register_vmap("cnnops::batch_norm_forward")
def _batch_norm_forward_vmap(info, in_dims, input, weight, bias, running_mean, running_var, training, momentum,
                             eps):
    batched = [name for name, d in zip(("weight", "bias", "running_mean", "running_var"), in_dims[1:5])
               if d is not None]
    if batched:
        raise NotImplementedError(f"cnnops::batch_norm_forward under vmap: batched {', '.join(batched)} is not "
                                  "supported (only the input may be batched)")
    B = info.batch_size
    x = input.movedim(in_dims[0], 0) if in_dims[0] is not None else input.expand(B, *input.shape)
    if not training:
        # Constant per-channel statistics: the vmapped samples are more rows of the batch.
        out, mean, invstd = ops.batch_norm_forward(x.reshape(B * x.size(1), *x.shape[2:]), weight, bias,
                                                   running_mean, running_var, False, momentum, eps)
        return (out.reshape(x.shape), mean, invstd), (0, None, None)
    if running_mean is not None or running_var is not None:
        raise NotImplementedError("cnnops::batch_norm_forward under vmap: training with running statistics is "
                                  "not supported (every sample would update the same buffers); use eval mode or "
                                  "no running statistics")
    # Statistics per vmapped sample: its channels become B x C channels of one batch.
    N, C = x.size(1), x.size(2)
    folded = x.movedim(0, 1).reshape(N, B * C, *x.shape[3:])
    out, mean, invstd = ops.batch_norm_forward(folded, None if weight is None else weight.repeat(B),
                                               None if bias is None else bias.repeat(B), None, None, True,
                                               momentum, eps)
    out = out.reshape(N, B, C, *x.shape[3:]).movedim(1, 0)
    return (out, mean.reshape(B, C), invstd.reshape(B, C)), (0, 0, 0)

# ============================================================================================
# SyncBatchNorm pieces (cnnops.nn.SyncBatchNorm)
# ============================================================================================
# Per-rank kernels; the ranks combine their results with torch.distributed in
# cnnops.autograd.SyncBatchNormFunction. Statistics and sums are in the input's opmath dtype.


def _check_batch_norm_input(input):
    torch._check(input.dim() >= 2, lambda: f"input: expected at least 2 dims (N, C, *), got {input.dim()}D")
    return input.size(1)


@torch.library.register_fake("cnnops::batch_norm_stats")
def _batch_norm_stats_fake(input):
    channels = _check_batch_norm_input(input)
    mean = input.new_empty([channels], dtype=_opmath_dtype(input.dtype))
    return mean, torch.empty_like(mean)


@torch.library.register_fake("cnnops::batch_norm_elemt")
def _batch_norm_elemt_fake(input, weight, bias, mean, invstd):
    channels = _check_batch_norm_input(input)
    for tensor, name in ((weight, "weight"), (bias, "bias"), (mean, "mean"), (invstd, "invstd")):
        _check_per_channel(tensor, name, channels)
    return torch.empty_like(input, memory_format=_kept_memory_format(input))


@torch.library.register_fake("cnnops::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    channels = _check_batch_norm_input(input)
    torch._check(grad_output.shape == input.shape, lambda: "grad_output: expected the input's shape")
    for tensor, name in ((weight, "weight"), (mean, "mean"), (invstd, "invstd"), (sum_dy, "sum_dy"),
                         (sum_dy_xmu, "sum_dy_xmu")):
        _check_per_channel(tensor, name, channels)
    return torch.empty_like(input, memory_format=_kept_memory_format(input))
