"""One torch.autograd.Function per op family: the forward op, what it saves, the backward op.

Every Function saves in forward(ctx, ...) rather than in a separate setup_context: with
setup_context, Function.apply binds default arguments through inspect.signature on every call
(~50 us, several times a small pool's or norm's own cost). The backward ops are single kernels
with no derivative of their own, so @once_differentiable makes a double backward raise instead
of silently returning zeros (convolution's backward is differentiable only through its op too).
"""
import torch
from torch.autograd.function import once_differentiable

from ._ops import ops


def _selected(grads, mask):
    """The backward ops return empty tensors for the gradients output_mask left out: None."""
    return tuple(g if wanted else None for g, wanted in zip(grads, mask))


class ConvFunction(torch.autograd.Function):
    """Convolution with symmetric zero padding; 1d/2d/3d from the weight's rank.

    apply(input, weight, bias, stride, padding, dilation, groups, activation="none"), with
    stride, padding and dilation as tuples of one int per spatial dim. Input must be batched.
    activation="relu" returns relu(conv(...)), the ReLU applied by the kernels as they write
    the output (one op, no second pass).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, activation="none"):
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None
        ctx.relu = activation == "relu"
        output = ops.conv_forward(input, weight, bias, *ctx.conv_args, activation)
        # relu's backward needs where the output is positive: the output itself is saved (no copy).
        ctx.save_for_backward(input, weight, output if ctx.relu else None)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if not any(mask):
            return None, None, None, None, None, None, None, None
        if ctx.relu:
            # d relu(z)/dz = 1 where z > 0, else 0 (torch's threshold_backward: zero where the
            # output is <= 0). This mask is Python glue, one elementwise pass over grad_output;
            # the convolution backward that follows is ours.
            grad_output = torch.where(output <= 0, 0, grad_output)
        grads = ops.conv_backward(grad_output, input, weight, *ctx.conv_args, mask)
        return (*_selected(grads, mask), None, None, None, None, None)


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------
# Inputs are batched (N x C x *spatial); the pooling parameters are lists of one int per
# spatial dim, already resolved by cnnops.functional. Indices are int64 outputs without a
# gradient.


class MaxPoolFunction(torch.autograd.Function):
    """Max pooling with argmax indices. apply(input, kernel_size, stride, padding, dilation,
    ceil_mode) -> (output, indices). Backward routes each gradient to its window's argmax."""

    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, dilation, ceil_mode):
        ctx.pool_args = (list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
        output, indices = ops.max_pool_forward(input, *ctx.pool_args)
        ctx.mark_non_differentiable(indices)
        # Else autograd hands backward a zero tensor of the indices' shape for grad_indices
        # (int64, twice the output's bytes): a whole extra allocation and pass for nothing.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, indices)
        return output, indices

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_indices):
        if grad_output is None:
            return None, None, None, None, None, None
        input, indices = ctx.saved_tensors
        grad_input = ops.max_pool_backward(grad_output, input, indices, *ctx.pool_args)
        return grad_input, None, None, None, None, None


class AvgPoolFunction(torch.autograd.Function):
    """Average pooling. apply(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override), divisor_override 0 meaning none. Backward spreads each gradient evenly
    over its window (divided by the same divisor)."""

    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.pool_args = (list(kernel_size), list(stride), list(padding), bool(ceil_mode), bool(count_include_pad),
                         int(divisor_override))
        ctx.save_for_backward(input)
        return ops.avg_pool_forward(input, *ctx.pool_args)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = ops.avg_pool_backward(grad_output, input, *ctx.pool_args)
        return grad_input, None, None, None, None, None, None


class AdaptiveAvgPoolFunction(torch.autograd.Function):
    """Adaptive average pooling. apply(input, output_size), every entry of output_size resolved."""

    @staticmethod
    def forward(ctx, input, output_size):
        ctx.save_for_backward(input)
        return ops.adaptive_avg_pool_forward(input, list(output_size))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        return ops.adaptive_avg_pool_backward(grad_output, input), None


class AdaptiveMaxPoolFunction(torch.autograd.Function):
    """Adaptive max pooling with argmax indices. apply(input, output_size) -> (output, indices)."""

    @staticmethod
    def forward(ctx, input, output_size):
        output, indices = ops.adaptive_max_pool_forward(input, list(output_size))
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)  # no zero grad_indices (see MaxPoolFunction)
        ctx.save_for_backward(input, indices)
        return output, indices

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_indices):
        if grad_output is None:
            return None, None
        input, indices = ctx.saved_tensors
        return ops.adaptive_max_pool_backward(grad_output, input, indices), None


class MaxUnpoolFunction(torch.autograd.Function):
    """Max unpooling: scatters input into a zero output of spatial size output_size at the flat
    per-plane positions in indices. apply(input, indices, output_size). Backward gathers
    grad_output at the same positions; indices get no gradient."""

    @staticmethod
    def forward(ctx, input, indices, output_size):
        ctx.save_for_backward(input, indices)
        return ops.max_unpool_forward(input, indices, list(output_size))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, indices = ctx.saved_tensors
        return ops.max_unpool_backward(grad_output, input, indices), None, None


# ============================================================================================
# Normalization
# ============================================================================================
# Each Function returns (output, mean, invstd): the statistics the forward op normalized with
# are saved for the backward op and handed back (non-differentiable) so instance norm can
# update its running statistics from them.


def _save_bias_dtype(ctx, input, weight, bias, param_shape):
    """The backward ops return grad_bias in the weight's dtype (they are not given the bias).
    Without a weight, a bias of another dtype than the input's (float32 bias, bfloat16 input)
    gets a unit weight in its dtype in the backward: exact, and no detour through bfloat16."""
    ctx.unit_weight = None
    if weight is None and bias is not None and bias.dtype != input.dtype:
        ctx.unit_weight = (list(param_shape), bias.dtype)


def _backward_weight(ctx, input, weight):
    if ctx.unit_weight is None:
        return weight
    shape, dtype = ctx.unit_weight
    return torch.ones(shape, dtype=dtype, device=input.device)


def _norm_mask(ctx, weight_index, bias_index):
    """output_mask for (input, weight, bias): only the gradients autograd asks for."""
    return [
        ctx.needs_input_grad[0],
        ctx.has_weight and ctx.needs_input_grad[weight_index],
        ctx.has_bias and ctx.needs_input_grad[bias_index],
    ]


class BatchNormFunction(torch.autograd.Function):
    """Batch norm over N x C x *: apply(input, weight, bias, running_mean, running_var,
    training, momentum, eps) -> (output, mean, invstd).

    training=True normalizes with the batch statistics and updates the running statistics (when
    given) in place; training=False normalizes with the running statistics.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        out, mean, invstd = ops.batch_norm_forward(input, weight, bias, running_mean, running_var, training,
                                                   momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        _save_bias_dtype(ctx, input, weight, bias, [input.size(1)])
        ctx.training = training
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = _norm_mask(ctx, 1, 2)
        if not any(mask):
            return (None,) * 8
        grads = ops.batch_norm_backward(
            grad_output, input, _backward_weight(ctx, input, weight), mean, invstd, ctx.training, mask
        )
        return (*_selected(grads, mask), None, None, None, None, None)


class LayerNormFunction(torch.autograd.Function):
    """Layer norm over the trailing normalized_shape: apply(input, normalized_shape, weight,
    bias, eps) -> (output, mean, invstd), statistics of the input's leading shape."""

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, bias, eps):
        out, mean, invstd = ops.layer_norm_forward(input, list(normalized_shape), weight, bias, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        _save_bias_dtype(ctx, input, weight, bias, normalized_shape)
        ctx.normalized_shape = list(normalized_shape)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = _norm_mask(ctx, 2, 3)
        if not any(mask):
            return (None,) * 5
        grad_input, grad_weight, grad_bias = _selected(ops.layer_norm_backward(
            grad_output, input, ctx.normalized_shape, mean, invstd, _backward_weight(ctx, input, weight), mask
        ), mask)
        return grad_input, None, grad_weight, grad_bias, None


class GroupNormFunction(torch.autograd.Function):
    """Group norm over N x C x *: apply(input, weight, bias, num_groups, eps) ->
    (output, mean, invstd), statistics of shape N x num_groups. Instance norm is
    num_groups = C."""

    @staticmethod
    def forward(ctx, input, weight, bias, num_groups, eps):
        out, mean, invstd = ops.group_norm_forward(input, weight, bias, num_groups, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        _save_bias_dtype(ctx, input, weight, bias, [input.size(1)])
        ctx.num_groups = num_groups
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = _norm_mask(ctx, 1, 2)
        if not any(mask):
            return (None,) * 5
        grads = ops.group_norm_backward(
            grad_output, input, mean, invstd, _backward_weight(ctx, input, weight), ctx.num_groups, mask
        )
        return (*_selected(grads, mask), None, None)
