"""torch.nn.functional-compatible functions: same signatures, results and exceptions.

Argument normalisation and the checks torch makes in Python live here; shape, dtype and
device checks are in C++ (csrc/common) so the raw ops are safe on their own.
"""
import numbers

import torch
import torch.nn.functional as F

from .autograd import ConvFunction

__all__ = ["conv1d", "conv2d", "conv3d"]


def _expand(value, name, dims):
    """An int or a sequence of 1 or `dims` ints, as torch's expand_param_if_needed."""
    values = [value] if isinstance(value, numbers.Integral) else list(value)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an int or a tuple of {dims} ints, but got {name}={value!r}")
    if len(values) == 1:
        values = values * dims
    if len(values) != dims:
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of {dims} values to match "
            f"the convolution dimensions, but got {name}={list(values)}"
        )
    return tuple(int(v) for v in values)


def _same_padding(input, weight, stride, dilation, dims):
    """padding='same': the dilated kernel's extent minus one, split left/right. An odd total
    puts the extra element on the right, by padding the input first (as torch does)."""
    if any(s != 1 for s in stride):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    totals = [dilation[i] * (weight.size(2 + i) - 1) for i in range(dims)]
    left = tuple(t // 2 for t in totals)
    extra = [t - 2 * l for t, l in zip(totals, left)]
    if any(extra):
        pad = []
        for e in reversed(extra):  # F.pad lists the last dim first
            pad += [0, e]
        input = F.pad(input, pad)
    return input, left


def _conv(input, weight, bias, stride, padding, dilation, groups, dims):
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"conv{dims}d(): input and weight must be Tensors, but got "
            f"{type(input).__name__} and {type(weight).__name__}"
        )
    if input.dim() not in (dims + 1, dims + 2):
        raise RuntimeError(
            f"Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input to conv{dims}d, "
            f"but got input of size: {list(input.shape)}"
        )
    if weight.dim() != dims + 2:
        raise RuntimeError(
            f"weight: expected a {dims + 2}D weight (out_channels, in_channels/groups, *kernel) "
            f"for conv{dims}d, but got weight of size {list(weight.shape)}"
        )
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, but got groups={groups!r}")
    unbatched = input.dim() == dims + 1
    if unbatched:
        input = input.unsqueeze(0)
    stride = _expand(stride, "stride", dims)
    dilation = _expand(dilation, "dilation", dims)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * dims
        elif padding == "same":
            input, padding = _same_padding(input, weight, stride, dilation, dims)
        else:
            raise RuntimeError(f"Invalid padding string: '{padding}', expected 'same' or 'valid'")
    else:
        padding = _expand(padding, "padding", dims)
    out = ConvFunction.apply(input, weight, bias, stride, padding, dilation, int(groups))
    return out.squeeze(0) if unbatched else out


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """As torch.nn.functional.conv1d."""
    return _conv(input, weight, bias, stride, padding, dilation, groups, 1)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """As torch.nn.functional.conv2d."""
    return _conv(input, weight, bias, stride, padding, dilation, groups, 2)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """As torch.nn.functional.conv3d."""
    return _conv(input, weight, bias, stride, padding, dilation, groups, 3)
