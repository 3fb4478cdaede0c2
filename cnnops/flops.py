"""torch.utils.flop_counter formulas for the cnnops ops whose torch twins FlopCounterMode counts.

FlopCounterMode counts an op only if its formula is registered. torch counts convolution
(forward and backward) and nothing for pooling or normalization, so cnnops registers the two
convolution ops with torch's own formulas: a converted model then counts what the torch.nn
model counts, 2 FLOPs per multiply-accumulate (2 x cnnops.complexity's MACs). The fused ReLU of
conv_forward(activation="relu") counts nothing, as torch counts no FLOPs for relu.
"""
import torch
from torch.utils import flop_counter

from . import _ops  # noqa: F401  (the ops must be registered first)

__all__ = []

_ops_ns = torch.ops.cnnops
# torch's formula on shapes (register_flop_formula returns it wrapped to take tensors)
_torch_conv_backward_flop = getattr(flop_counter.conv_backward_flop, "__wrapped__", flop_counter.conv_backward_flop)


@flop_counter.register_flop_formula(_ops_ns.conv_forward)
def _conv_forward_flop(x_shape, w_shape, _bias, _stride, _padding, _dilation, _groups, *args, out_shape=None,
                       **kwargs):
    # torch's aten.convolution formula: 2 * N * prod(out spatial) * prod(weight shape)
    return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


@flop_counter.register_flop_formula(_ops_ns.conv_backward)
def _conv_backward_flop(grad_out_shape, x_shape, w_shape, stride, padding, dilation, groups, output_mask,
                        out_shape=None, **kwargs):
    # torch's aten.convolution_backward formula, which counts grad_input and grad_weight per
    # output_mask (grad_bias is a sum, no FLOPs)
    return _torch_conv_backward_flop(grad_out_shape, x_shape, w_shape, None, stride, padding, dilation, False,
                                     [0] * len(stride), groups, output_mask, out_shape)
