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


# ============================================================================================
# Normalization
# ============================================================================================
# Batch, layer, group and instance norm. The checks torch makes in Python (and the messages of
# the ones it makes in C++ that a user meets first) are here; the ops check again in C++.

from .autograd import BatchNormFunction, GroupNormFunction, LayerNormFunction  # noqa: E402

__all__ += ["batch_norm", "layer_norm", "group_norm", "instance_norm"]


def _verify_batch_size(size):
    """torch's check: training statistics need more than one value per channel."""
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _verify_spatial_size(size):
    """torch's check: instance statistics need more than one spatial element."""
    values = 1
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def _check_channel_params(input, **tensors):
    """weight, bias, running_mean, running_var: one value per channel (input.size(1))."""
    channels = input.size(1)
    for name, tensor in tensors.items():
        if tensor is not None and tensor.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {tensor.numel()}")


def _check_tensor(input, fn):
    """A floating-point Tensor; torch raises NotImplementedError from its dtype dispatch for
    the others, and so does cnnops."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}(): input must be a Tensor, but got {type(input).__name__}")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"{fn}\" not implemented for input of dtype {input.dtype} "
                                  "(cnnops supports float32, float64, bfloat16 and float16)")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """As torch.nn.functional.batch_norm. In training, the running statistics (when given) are
    updated in place: running = (1 - momentum) * running + momentum * batch statistic, with the
    unbiased variance."""
    _check_tensor(input, "batch_norm")
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.dim() < 2:
        raise RuntimeError(f"batch_norm: expected input with at least 2 dims (N, C, *), got {input.dim()}D "
                           f"input of size {list(input.shape)}")
    if not training:
        for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
            if tensor is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    _check_channel_params(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    # torch only counts the elements of weight and bias: a (C, 1) weight is accepted
    weight = weight if weight is None or weight.dim() == 1 else weight.reshape(-1)
    bias = bias if bias is None or bias.dim() == 1 else bias.reshape(-1)
    out, _, _ = BatchNormFunction.apply(input, weight, bias, running_mean, running_var, bool(training),
                                        float(momentum), float(eps))
    return out


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """As torch.nn.functional.layer_norm: normalizes over the trailing normalized_shape."""
    _check_tensor(input, "layer_norm")
    if isinstance(normalized_shape, numbers.Integral) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in normalized_shape
    ):
        raise TypeError(f"layer_norm(): argument 'normalized_shape' must be tuple of ints, "
                        f"but got {normalized_shape!r}")
    normalized_shape = tuple(int(s) for s in normalized_shape)
    if len(normalized_shape) == 0:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
                           "least one element, but got normalized_shape = []")
    leading = input.dim() - len(normalized_shape)
    if leading < 0 or tuple(input.shape[leading:]) != normalized_shape:
        raise RuntimeError(f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, normalized_shape))}], but got input of size{list(input.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tuple(tensor.shape) != normalized_shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                               f"{list(tensor.shape)} and normalized_shape = {list(normalized_shape)}")
    out, _, _ = LayerNormFunction.apply(input, normalized_shape, weight, bias, float(eps))
    return out


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """As torch.nn.functional.group_norm: statistics per (sample, group of C / num_groups
    channels), affine per channel."""
    _check_tensor(input, "group_norm")
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    _verify_batch_size([input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:]))
    channels = input.size(1)
    if num_groups <= 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    if channels % num_groups != 0:
        raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, but got input "
                           f"of shape {list(input.shape)} and num_groups={num_groups}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dim() != 1 or tensor.numel() != channels):
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of channels in input, "
                               f"but got {name} of shape {list(tensor.shape)} and input of shape {list(input.shape)}")
    out, _, _ = GroupNormFunction.apply(input, weight, bias, int(num_groups), float(eps))
    return out


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """As torch.nn.functional.instance_norm.

    use_input_stats=True: statistics per (sample, channel), i.e. group norm with one channel per
    group; running statistics, when given, are updated in place as torch does (with the
    per-channel average over the batch of the per-instance statistics). use_input_stats=False:
    normalizes with the running statistics, a per-channel scale and shift (batch norm in eval).
    """
    _check_tensor(input, "instance_norm")
    if use_input_stats:
        _verify_spatial_size(input.size())
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dim() < 2:
        raise RuntimeError(f"instance_norm: expected input with at least 2 dims (N, C, *), got {input.dim()}D")
    _check_channel_params(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if not use_input_stats:
        if running_mean is None:
            raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
        out, _, _ = BatchNormFunction.apply(input, weight, bias, running_mean, running_var, False,
                                            float(momentum), float(eps))
        return out
    out, mean, invstd = GroupNormFunction.apply(input, weight, bias, input.size(1), float(eps))
    if running_mean is not None:
        _update_instance_running_stats(input, mean, invstd, running_mean, running_var, float(momentum), float(eps))
    return out


def _update_instance_running_stats(input, mean, invstd, running_mean, running_var, momentum, eps):
    """torch runs batch norm on the input viewed as 1 x (N*C) x * with the running statistics
    repeated N times, then averages the N updated copies per channel. The average of
    (1 - m) * r + m * s_n over n is (1 - m) * r + m * mean_n(s_n), computed here from the
    per-(n, c) statistics of the forward: var = 1 / invstd^2 - eps (biased), times L / (L - 1)
    for the unbiased estimate over L spatial elements. An empty batch averages nothing and
    gives NaN, as in torch."""
    spatial = 1
    for s in input.shape[2:]:
        spatial *= s
    with torch.no_grad():
        batch_mean = mean.mean(0)
        batch_var = ((invstd.reciprocal().square() - eps) * (spatial / (spatial - 1))).mean(0)
        new_mean = running_mean.to(batch_mean.dtype) * (1.0 - momentum) + batch_mean * momentum
        new_var = running_var.to(batch_var.dtype) * (1.0 - momentum) + batch_var * momentum
        running_mean.copy_(new_mean.view_as(running_mean))
        running_var.copy_(new_var.view_as(running_var))
