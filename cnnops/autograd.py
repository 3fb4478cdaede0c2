"""One torch.autograd.Function per op family: the forward op, what it saves, the backward op."""
import torch

from ._ops import ops


class ConvFunction(torch.autograd.Function):
    """Convolution with symmetric zero padding; 1d/2d/3d from the weight's rank.

    apply(input, weight, bias, stride, padding, dilation, groups), with stride, padding and
    dilation as tuples of one int per spatial dim. Input must be batched.
    """

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return ops.conv_forward(input, weight, bias, list(stride), list(padding), list(dilation), groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, weight)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if not any(mask):
            return None, None, None, None, None, None, None
        grad_input, grad_weight, grad_bias = ops.conv_backward(
            grad_output, input, weight, *ctx.conv_args, mask
        )
        return (
            grad_input if mask[0] else None,
            grad_weight if mask[1] else None,
            grad_bias if mask[2] else None,
            None, None, None, None,
        )
