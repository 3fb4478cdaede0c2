"""torch.nn.functional-compatible functions: same signatures, results and exceptions.

Argument normalisation and the checks torch makes in Python live here; shape, dtype and
device checks are in C++ (csrc/common) so the raw ops are safe on their own. Each function ends
in one op call (autograd, autocast and tracing live on the op's dispatch keys), made through
cnnops._C.call in eager mode and through torch.ops otherwise (cnnops._ops.fast_call_ok).

An input that is not a Tensor but has __torch_function__ (an FX Proxy) gets its override with
the public function, as torch.nn.functional's functions do: torch.fx.symbolic_trace records
each call as one call_function node (cnnops/_fx.py). A Tensor pays one isinstance check for it
(the convolutions none: their argument checks make it anyway); Tensor subclasses and
TorchFunctionModes see the op (torch.ops.cnnops.*) in __torch_function__.
"""
import numbers
import warnings

import torch
import torch.nn.functional as F

from . import _C, _fx
from ._ops import _has_torch_function, call, fast_call_ok
from .onnx import ops  # torch.ops.cnnops, the torch twins while torch.onnx.export runs

__all__ = ["conv1d", "conv2d", "conv3d"]


def _untraced(value):
    """torch.jit.trace hands ints computed from shapes over as 0-dim tensors (sequences of them):
    their values, which the trace records as constants with torch's TracerWarning, as torch's
    argument parser does for int arguments."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        return int(value)
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(_untraced(v) for v in value)
    return value


def _int_tuple(value, name, dims, fname=None, check=True):
    """kernel_size, stride, padding, dilation: an int or a sequence of 1 or `dims` ints, as a tuple
    of `dims` ints, with torch's errors: for convolution (fname None) expand_param_if_needed's,
    which takes no SymInt; for the pools torch's argument parser's, naming fname. check=False is
    torch's _single/_pair/_triple (max unpool): a sequence passes through, checked later."""
    # Fast paths for what modules and most callers pass (an int, or `dims` ints): every call
    # pays this, and a small layer costs only microseconds.
    if type(value) is int:
        return (value,) * dims
    if type(value) in (tuple, list) and len(value) == dims and all(type(v) is int for v in value):
        return tuple(value)
    if torch.jit.is_tracing():
        value = _untraced(value)
    if not check:
        return tuple(value) if isinstance(value, (tuple, list, torch.Size)) else (value,) * dims
    if fname is None:
        values = [value] if isinstance(value, numbers.Integral) else list(value)
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{name} must be an int or a tuple of {dims} ints, but got {name}={value!r}")
    else:
        if _is_int(value):
            return (value,) * dims
        if isinstance(value, bool) or not isinstance(value, (tuple, list, torch.Size)):
            raise TypeError(f"{fname}(): argument '{name}' must be tuple of ints, not {type(value).__name__}")
        values = list(value)
        for i, v in enumerate(values):
            if not _is_int(v):
                raise TypeError(f"{fname}(): argument '{name}' must be tuple of ints, but found element of type "
                                f"{type(v).__name__} at pos {i}")
    if len(values) == 1:
        values = values * dims
    if len(values) != dims:
        if fname is None:
            raise RuntimeError(
                f"expected {name} to be a single integer value or a list of {dims} values to match "
                f"the convolution dimensions, but got {name}={list(values)}"
            )
        raise RuntimeError(f"{fname}: {name} must either be a single int, or a tuple of {dims} ints, but got "
                           f"{name}={tuple(value)}")
    return tuple(int(v) for v in values) if fname is None else tuple(values)


def _same_padding(input, weight, stride, dilation, dims):
    """padding='same': the dilated kernel's extent minus one, split left/right. An odd total
    puts the extra element on the right, by padding the input first (as torch does)."""
    if any(s != 1 for s in stride):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    totals = [dilation[i] * (weight.size(2 + i) - 1) for i in range(dims)]
    # C++ division, as torch's: a zero kernel's total of -dilation rounds toward zero
    left = tuple(t // 2 if t >= 0 else -(-t // 2) for t in totals)
    extra = [t - 2 * lo for t, lo in zip(totals, left)]
    if any(extra):
        pad = []
        for e in reversed(extra):  # F.pad lists the last dim first
            pad += [0, e]
        input = F.pad(input, pad)
    return input, left


_CONV_FORWARD = _C.op("conv_forward")


def _conv(input, weight, bias, stride, padding, dilation, groups, dims, *, _activation="none"):
    """conv{dims}d; _activation="relu" (private, for cnnops.nn.ConvReLU*) fuses a ReLU into the
    kernel's output step: relu(conv{dims}d(...)) in one op."""
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        if _has_torch_function((input, weight, bias)):  # an FX Proxy: one node
            if _activation != "none":  # cnnops.nn.ConvReLU*d traced through: this function, activation kept
                return _fx.handle(_conv, (input, weight, bias), input, weight, bias, stride, padding, dilation,
                                  groups, dims, _activation=_activation)
            return _fx.handle(globals()[f"conv{dims}d"], (input, weight, bias), input, weight, bias, stride,
                              padding, dilation, groups)
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
    if type(groups) is not int and (not isinstance(groups, numbers.Integral) or isinstance(groups, bool)):
        raise TypeError(f"groups must be an int, but got groups={groups!r}")
    unbatched = input.dim() == dims + 1
    if unbatched:
        input = input.unsqueeze(0)
    stride = _int_tuple(stride, "stride", dims)
    dilation = _int_tuple(dilation, "dilation", dims)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * dims
        elif padding == "same":
            input, padding = _same_padding(input, weight, stride, dilation, dims)
        else:
            raise RuntimeError(f"Invalid padding string: '{padding}', expected 'same' or 'valid'")
    else:
        padding = _int_tuple(padding, "padding", dims)
    args = (input, weight, bias, stride, padding, dilation, int(groups), _activation)
    out = call(_CONV_FORWARD, *args) if fast_call_ok(input, weight, bias) else ops.conv_forward(*args)
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


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------
# Same signatures, defaults and results as torch.nn.functional's pools. The arguments are
# resolved here to one int per spatial dim; what torch rejects in Python (or before its
# kernels) is rejected here with the same exception type. The kernels' own checks
# (csrc/common/pool_checks.h) keep the raw ops safe. The ops carry their own autograd, to any
# order and in forward mode (csrc/autograd/pool.cpp).

__all__ += [
    "max_pool1d", "max_pool2d", "max_pool3d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_unpool1d", "max_unpool2d", "max_unpool3d",
]

_INT_TYPES = (numbers.Integral, torch.SymInt)
_MAX_POOL_FORWARD = _C.op("max_pool_forward")
_AVG_POOL_FORWARD = _C.op("avg_pool_forward")
_ADAPTIVE_AVG_POOL_FORWARD = _C.op("adaptive_avg_pool_forward")
_ADAPTIVE_MAX_POOL_FORWARD = _C.op("adaptive_max_pool_forward")


def _is_int(v):
    return isinstance(v, _INT_TYPES) and not isinstance(v, bool)


def _check_bool(value, name, fname):
    if not isinstance(value, bool):
        raise TypeError(f"{fname}(): argument '{name}' must be bool, not {type(value).__name__}")


def _check_pool_tensor(input, fname, name="input"):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fname}(): argument '{name}' must be Tensor, not {type(input).__name__}")


_QUANTIZED_HINT = ("; cnnops has no quantized kernels: call cnnops.revert(model) before torch.ao.quantization "
                   "prepares the model")


def _check_floating(input, fname):
    """cnnops' kernels are for floating-point tensors; torch either computes integer pools or
    raises NotImplementedError, so anything else is a gap cnnops names, never a wrong result."""
    if not input.is_floating_point():
        raise NotImplementedError(f"cnnops {fname}: input dtype {input.dtype} is not supported "
                                  f"(floating-point inputs only){_QUANTIZED_HINT if input.is_quantized else ''}")


def _check_pool_rank(input, dims, fname):
    if input.dim() not in (dims + 1, dims + 2):
        raise RuntimeError(f"{fname}: Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input, but got "
                           f"input of size: {list(input.shape)}")


def _batched(input, dims):
    """Adds the batch dim of unbatched input; returns (input, unbatched)."""
    return (input.unsqueeze(0), True) if input.dim() == dims + 1 else (input, False)


def _batched_at(input, dims):
    """As _batched, but returns the dim to squeeze (None when batched): an unbatched input
    with zero channels, which torch pools to an empty result, runs as batch 0 of one channel."""
    if input.dim() != dims + 1:
        return input, None
    at = 1 if input.size(0) == 0 else 0
    return input.unsqueeze(at), at


_WINDOW_ARGS = {}  # resolved window arguments by their Python values: a module passes the same ones each call


def _window_args(fname, dims, kernel_size, stride, padding, dilation, after_parsing=None, int64_ok=False):
    """Resolves kernel_size, stride (None or empty: kernel_size), padding and dilation to lists
    and checks them in torch's order, each message naming its argument. after_parsing() runs
    between the two, where torch makes its other checks. Valid arguments of exact types (ints,
    tuples of ints) are remembered, so a layer called again pays one dict lookup (the kernels
    take the lists and never modify them); torch.compile traces the checks themselves."""
    if torch.compiler.is_compiling():
        return _resolve_window_args(fname, dims, kernel_size, stride, padding, dilation, after_parsing, int64_ok)
    key = _exact_int_key(fname, int64_ok, kernel_size, stride, padding, dilation)
    resolved = _WINDOW_ARGS.get(key) if key is not None else None
    if resolved is None:
        resolved = _resolve_window_args(fname, dims, kernel_size, stride, padding, dilation, after_parsing, int64_ok)
        if key is not None and len(_WINDOW_ARGS) < 4096:
            _WINDOW_ARGS[key] = resolved
    elif after_parsing is not None:
        after_parsing()
    return resolved


def _exact_int_key(*values):
    """values as a dict key when each after the first two is None, an int or a tuple of ints,
    else None (2.0 == 2 as a key, but torch rejects a float kernel size)."""
    for v in values[2:]:
        if not (v is None or type(v) is int or (type(v) is tuple and all(type(e) is int for e in v))):
            return None
    return values


def _resolve_window_args(fname, dims, kernel_size, stride, padding, dilation, after_parsing, int64_ok):
    kernel_size = _int_tuple(kernel_size, "kernel_size", dims, fname)
    if stride is None or (type(stride) in (tuple, list) and not stride):
        stride = kernel_size
    else:
        stride = _int_tuple(stride, "stride", dims, fname)
    padding = _int_tuple(padding, "padding", dims, fname)
    dilation = _int_tuple(dilation, "dilation", dims, fname)
    if not int64_ok:  # torch's pools but max_pool1d without indices take these as C++ ints
        for v in kernel_size + stride + padding + dilation:
            if not -(2**31) <= v < 2**31:
                raise RuntimeError(f"{fname}: value cannot be converted to type int without overflow: {v}")
    if after_parsing is not None:
        after_parsing()
    if min(kernel_size) <= 0:
        raise RuntimeError(f"{fname}: kernel_size should be greater than zero, but got "
                           f"kernel_size={tuple(kernel_size)}")
    if min(stride) <= 0:
        raise RuntimeError(f"{fname}: stride should be greater than zero, but got stride={tuple(stride)}")
    if min(dilation) <= 0:
        raise RuntimeError(f"{fname}: dilation should be greater than zero, but got dilation={tuple(dilation)}")
    if min(padding) < 0:
        raise RuntimeError(f"{fname}: pad must be non-negative, but got padding={tuple(padding)}")
    # torch bounds the padding by half the kernel itself, even when dilation widens the window.
    for p, k in zip(padding, kernel_size):
        if p > k // 2:
            raise RuntimeError(f"{fname}: pad should be at most half of kernel size, but got "
                               f"padding={tuple(padding)} and kernel_size={tuple(kernel_size)}")
    return kernel_size, stride, padding, dilation


def _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, dims):
    fname = f"max_pool{dims}d"
    if not isinstance(input, torch.Tensor) and _has_torch_function((input,)):
        return _fx.handle(globals()[fname], (input,), input, kernel_size, stride, padding, dilation, ceil_mode,
                          return_indices)
    _check_pool_tensor(input, fname)
    _check_bool(ceil_mode, "ceil_mode", fname)
    kernel_size, stride, padding, dilation = _window_args(fname, dims, kernel_size, stride, padding, dilation,
                                                          int64_ok=dims == 1 and not return_indices)
    _check_pool_rank(input, dims, fname)
    _check_floating(input, fname)
    x, unbatched = _batched(input, dims)
    args = (x, kernel_size, stride, padding, dilation, ceil_mode)
    out, indices = call(_MAX_POOL_FORWARD, *args) if fast_call_ok(x) else ops.max_pool_forward(*args)
    if unbatched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return (out, indices) if return_indices else out


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """As torch.nn.functional.max_pool1d."""
    return _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, 1)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """As torch.nn.functional.max_pool2d."""
    return _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, 2)


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """As torch.nn.functional.max_pool3d."""
    return _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, 3)


def _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, dims):
    fname = f"avg_pool{dims}d"
    if not isinstance(input, torch.Tensor) and _has_torch_function((input,)):
        args = (kernel_size, stride, padding, ceil_mode, count_include_pad) + ((divisor_override,) if dims > 1 else ())
        return _fx.handle(globals()[fname], (input,), input, *args)
    _check_pool_tensor(input, fname)
    _check_bool(ceil_mode, "ceil_mode", fname)
    _check_bool(count_include_pad, "count_include_pad", fname)
    if divisor_override is None:
        divisor_override = 0  # the ops' "none"; any other value, negative ones too, divides as in torch
    elif not _is_int(divisor_override):
        raise TypeError(f"{fname}(): argument 'divisor_override' must be int, not {type(divisor_override).__name__}")
    elif divisor_override == 0:
        raise RuntimeError(f"{fname}: divisor_override must be not zero")
    def check_rank():
        if dims == 2 and input.dim() < 3:
            # torch's avg_pool2d indexes the input's third-to-last dim before it checks the
            # window's values, and so raises IndexError
            raise IndexError(f"{fname}: Dimension out of range: expected a 3D (unbatched) or 4D (batched) input, "
                             f"but got input of size: {list(input.shape)}")

    kernel_size, stride, padding, _ = _window_args(fname, dims, kernel_size, stride, padding, 1, check_rank)
    _check_pool_rank(input, dims, fname)
    _check_floating(input, fname)
    x, unbatched = _batched(input, dims)
    args = (x, kernel_size, stride, padding, ceil_mode, count_include_pad, int(divisor_override))
    out = call(_AVG_POOL_FORWARD, *args) if fast_call_ok(x) else ops.avg_pool_forward(*args)
    return out.squeeze(0) if unbatched else out


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """As torch.nn.functional.avg_pool1d."""
    return _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, None, 1)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """As torch.nn.functional.avg_pool2d."""
    return _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, 2)


def avg_pool3d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """As torch.nn.functional.avg_pool3d."""
    return _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, 3)


def _adaptive_output_size(input, output_size, dims, fname):
    """torch's rules: an int is repeated; 1d takes exactly one int; 2d/3d take `dims` entries,
    None meaning the input's size along that dim (torch.nn.modules.utils._list_with_default)."""
    try:
        return _resolve_adaptive_output_size(input, output_size, dims, fname)
    except TypeError:
        if not torch.jit.is_tracing():
            raise
        return _resolve_adaptive_output_size(input, _untraced(output_size), dims, fname)


def _resolve_adaptive_output_size(input, output_size, dims, fname):
    if type(output_size) is int or _is_int(output_size):
        sizes = [output_size] * dims
    elif dims == 1:
        if not isinstance(output_size, (tuple, list, torch.Size)):
            raise TypeError(f"{fname}(): argument 'output_size' must be tuple of ints, "
                            f"not {type(output_size).__name__}")
        if len(output_size) != 1:
            raise RuntimeError(f"{fname}() argument 'output_size' should contain one int (got {len(output_size)})")
        sizes = _int_tuple(output_size, "output_size", 1, fname)
    else:
        if not isinstance(output_size, (tuple, list, torch.Size)):
            raise TypeError(f"{fname}(): output_size must be an int or a tuple of {dims} ints or None, but got "
                            f"output_size of type {type(output_size).__name__}")
        if input.dim() <= len(output_size):
            raise ValueError(f"{fname}: Input dimension should be at least {len(output_size) + 1}, but got input of "
                             f"size {list(input.shape)}")
        trailing = input.shape[-len(output_size):] if len(output_size) else []
        sizes = [t if v is None else v for v, t in zip(output_size, trailing)]
        for i, v in enumerate(sizes):
            if not _is_int(v):
                raise TypeError(f"{fname}(): argument 'output_size' must be tuple of ints, but found element of type "
                                f"{type(v).__name__} at pos {i}")
        if len(sizes) != dims:
            raise RuntimeError(f"{fname}: output_size must be {dims} ints, but got output_size={tuple(output_size)}")
    if min(sizes) < 0:
        raise RuntimeError(f"{fname}: elements of output_size must be greater than or equal to 0, but got "
                           f"output_size={tuple(sizes)}")
    return list(sizes)


def _check_adaptive_input(input, dims, fname, allow_zero_channels):
    _check_pool_rank(input, dims, fname)
    # torch checks every dim but the first, whether or not it is the batch
    for i in range(1, input.dim()) if 0 in input.shape[1:] else ():
        if input.size(i) == 0 and not (allow_zero_channels and i == 1 and input.dim() == dims + 2):
            raise RuntimeError(f"{fname}(): Expected input to have non-zero size for non-batch dimensions, but input "
                               f"has sizes {list(input.shape)} with dimension {i} being empty")
    _check_floating(input, fname)


def _adaptive_avg_pool(input, output_size, dims):
    fname = f"adaptive_avg_pool{dims}d"
    if not isinstance(input, torch.Tensor) and _has_torch_function((input,)):
        return _fx.handle(globals()[fname], (input,), input, output_size)
    _check_pool_tensor(input, fname)
    sizes = _adaptive_output_size(input, output_size, dims, fname)
    if sizes == [1] * dims:
        # torch takes a global pool as a mean over the last dims, without the checks below: an
        # empty input gives an empty output, or NaN for an empty window; 2d and 3d pools take
        # any rank
        if input.numel() == 0 and input.dim() in (dims + 1, dims + 2):
            return input.mean(tuple(range(-dims, 0)), keepdim=True)
        if dims > 1 and input.dim() < dims:
            raise IndexError(f"{fname}: Dimension out of range: a global pool takes the mean over the last {dims} "
                             f"dims, but got input of size {list(input.shape)}")
        if dims > 1 and input.dim() not in (dims + 1, dims + 2):
            _check_floating(input, fname)  # torch's mean fails for integer inputs
            raise NotImplementedError(f"cnnops {fname}: a global pool of a {input.dim()}-D input (torch takes the "
                                      f"mean over its last {dims} dims) is not supported")
    # torch accepts zero channels for 1d/2d (an empty output), not for 3d.
    _check_adaptive_input(input, dims, fname, allow_zero_channels=dims < 3)
    x, at = _batched_at(input, dims)
    out = call(_ADAPTIVE_AVG_POOL_FORWARD, x, sizes) if fast_call_ok(x) else ops.adaptive_avg_pool_forward(x, sizes)
    return out if at is None else out.squeeze(at)


def adaptive_avg_pool1d(input, output_size):
    """As torch.nn.functional.adaptive_avg_pool1d."""
    return _adaptive_avg_pool(input, output_size, 1)


def adaptive_avg_pool2d(input, output_size):
    """As torch.nn.functional.adaptive_avg_pool2d (output_size entries may be None)."""
    return _adaptive_avg_pool(input, output_size, 2)


def adaptive_avg_pool3d(input, output_size):
    """As torch.nn.functional.adaptive_avg_pool3d (output_size entries may be None)."""
    return _adaptive_avg_pool(input, output_size, 3)


def _adaptive_max_pool(input, output_size, return_indices, dims):
    fname = f"adaptive_max_pool{dims}d"
    if not isinstance(input, torch.Tensor) and _has_torch_function((input,)):
        return _fx.handle(globals()[fname], (input,), input, output_size, return_indices)
    _check_pool_tensor(input, fname)
    sizes = _adaptive_output_size(input, output_size, dims, fname)
    _check_adaptive_input(input, dims, fname, allow_zero_channels=False)
    x, at = _batched_at(input, dims)
    out, indices = (call(_ADAPTIVE_MAX_POOL_FORWARD, x, sizes) if fast_call_ok(x)
                    else ops.adaptive_max_pool_forward(x, sizes))
    if at is not None:
        out, indices = out.squeeze(at), indices.squeeze(at)
    return (out, indices) if return_indices else out


def adaptive_max_pool1d(input, output_size, return_indices=False):
    """As torch.nn.functional.adaptive_max_pool1d."""
    return _adaptive_max_pool(input, output_size, return_indices, 1)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """As torch.nn.functional.adaptive_max_pool2d (output_size entries may be None)."""
    return _adaptive_max_pool(input, output_size, return_indices, 2)


def adaptive_max_pool3d(input, output_size, return_indices=False):
    """As torch.nn.functional.adaptive_max_pool3d (output_size entries may be None)."""
    return _adaptive_max_pool(input, output_size, return_indices, 3)


def _unpool_output_size(input, kernel_size, stride, padding, output_size):
    """torch.nn.functional._unpool_output_size: the default size inverts the pool's output-size
    formula, (I - 1) * S - 2P + K; a given output_size (optionally with N and C in front) must
    lie strictly within one stride of it."""
    input_size = input.size()
    default_size = []
    for d in range(len(kernel_size)):
        default_size.append((input_size[-len(kernel_size) + d] - 1) * stride[d] + kernel_size[d] - 2 * padding[d])
    if output_size is None:
        ret = default_size
    else:
        output_size = list(output_size)
        if len(output_size) == len(kernel_size) + 2:
            output_size = output_size[2:]
        if len(output_size) != len(kernel_size):
            raise ValueError(
                "output_size should be a sequence containing "
                f"{len(kernel_size)} or {len(kernel_size) + 2} elements, but it has a length of '{len(output_size)}'"
            )
        for d in range(len(kernel_size)):
            min_size = default_size[d] - stride[d]
            max_size = default_size[d] + stride[d]
            if not (min_size < output_size[d] < max_size):
                raise ValueError(
                    f'invalid output_size "{output_size}" (dim {d} must be between {min_size} and {max_size})'
                )
        ret = output_size
    for d in range(len(kernel_size)):
        if ret[d] < 0:
            raise ValueError("max_unpooling: output_size must contain non-negative spatial "
                             f"dimensions, but got output_size[{d}]={ret[d]}")
    return ret


def _max_unpool(input, indices, kernel_size, stride, padding, output_size, dims):
    fname = f"max_unpool{dims}d"
    if not isinstance(input, torch.Tensor) and _has_torch_function((input, indices)):
        return _fx.handle(globals()[fname], (input, indices), input, indices, kernel_size, stride, padding,
                          output_size)
    _check_pool_tensor(input, fname)
    _check_pool_tensor(indices, fname, "indices")
    kernel_size = _int_tuple(kernel_size, "kernel_size", dims, check=False)
    stride = kernel_size if stride is None else _int_tuple(stride, "stride", dims, check=False)
    padding = _int_tuple(padding, "padding", dims, check=False)
    if output_size is not None and not isinstance(output_size, (tuple, list, torch.Size)):
        raise TypeError(f"{fname}(): output_size must be a sequence of ints, but got {type(output_size).__name__}")
    sizes = _unpool_output_size(input, kernel_size, stride, padding, output_size)
    for i, v in enumerate(sizes):  # torch's C++ argument parser, before the op checks the length
        if isinstance(v, torch.Tensor) and v.dim() == 0 and torch.jit.is_tracing():
            # a size computed from the input's shape: the op takes it as a constant (torch cannot
            # trace max_unpool at all), so the trace holds for the traced input size only
            warnings.warn(f"{fname}: the output size is fixed at {int(v)} in the trace; the traced program gives "
                          "wrong results for inputs of other sizes", torch.jit.TracerWarning, stacklevel=3)
            continue
        if not _is_int(v):
            raise TypeError(f"{fname}(): argument 'output_size' must be tuple of ints, but found element of type "
                            f"{type(v).__name__} at pos {i}")
        if not -(2**63) <= v < 2**63:
            raise TypeError(f"{fname}(): argument 'output_size' failed to unpack the object at pos {i} with error "
                            "\"Overflow when unpacking long long\"")
    if torch.jit.is_tracing():  # the values of those 0-dim tensors, constants in the trace
        sizes = [int(v) if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() else v
                 for v in sizes]
    if len(sizes) != dims:
        raise RuntimeError(f"{fname}: there should be exactly {dims} elements in output_size, but got "
                           f"output_size={tuple(sizes)} (from kernel_size={kernel_size})")
    if dims == 3:  # torch's 3d op checks the lengths (2d ignores stride and padding)
        for name, value in (("stride", stride), ("padding", padding)):
            if len(value) != 3:
                raise RuntimeError(f"{fname}: There should be exactly three elements (depth, height, width) in "
                                   f"{name}, but got: {len(value)} elements.")
    if dims == 3 and any(s <= 0 for s in stride[:3]):
        raise RuntimeError(f"{fname}: strides should be greater than zero, but got stride={tuple(stride)}")
    if input.dim() not in (dims + 1, dims + 2):
        raise RuntimeError(f"{fname}: Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input, but got "
                           f"input of size: {list(input.shape)}")
    if indices.dtype != torch.int64:
        raise RuntimeError(f"{fname}: elements in indices should be type int64 but got: {indices.dtype}")
    if indices.shape != input.shape:
        raise RuntimeError(f"{fname}: Expected shape of indices to be same as that of the input tensor "
                           f"({list(input.shape)}) but got indices tensor with shape: {list(indices.shape)}")
    _check_floating(input, fname)
    x, at = _batched_at(input, dims)
    if at is not None:
        indices = indices.unsqueeze(at)
    if any(v == 0 for v in sizes) and indices.numel() > 0:
        # torch returns the empty output without looking at the indices (cnnops' kernel checks
        # every index against the output plane)
        out = _EmptyUnpool.apply(x, indices, list(sizes))
    else:
        out = ops.max_unpool_forward(x, indices, list(sizes))
    return out if at is None else out.squeeze(at)


class _EmptyUnpool(torch.autograd.Function):
    """max_unpool to an empty output plane. Backward is torch's derivative, the output's
    gradient gathered at the indices, which fails as torch's does (every index is out of the
    empty plane)."""

    @staticmethod
    def forward(ctx, x, indices, sizes):
        ctx.save_for_backward(indices)
        return x.new_zeros(list(x.shape[:2]) + sizes)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return grad.flatten(2).gather(2, indices.flatten(2)).view_as(indices), None, None


def max_unpool1d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """As torch.nn.functional.max_unpool1d."""
    return _max_unpool(input, indices, kernel_size, stride, padding, output_size, 1)


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """As torch.nn.functional.max_unpool2d."""
    return _max_unpool(input, indices, kernel_size, stride, padding, output_size, 2)


def max_unpool3d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """As torch.nn.functional.max_unpool3d."""
    return _max_unpool(input, indices, kernel_size, stride, padding, output_size, 3)
# ============================================================================================
# Normalization
# ============================================================================================
# Batch, layer, group and instance norm. The checks torch makes in Python (and the messages of
# the ones it makes in C++ that a user meets first) are here; the ops check again in C++.

# The ops are differentiable in the dispatcher (csrc/autograd/norm.cpp): first and higher
# order, forward-mode AD and torch.func all go through the raw ops called here.
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


def _check_running_stats_need_no_grad(fn, running_mean, running_var):
    """Running statistics are buffers updated in place, never differentiated: torch refuses
    ones that require grad (while grad mode is on), and so does cnnops."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
        if tensor is not None and tensor.requires_grad:
            raise RuntimeError(f"{fn}(): the function is not differentiable with respect to argument '{name}'. "
                               "This input cannot have requires_grad True.")


def _check_tensor(input, fn):
    """A floating-point Tensor; torch raises NotImplementedError from its dtype dispatch for
    the others, and so does cnnops."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}(): input must be a Tensor, but got {type(input).__name__}")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"{fn}\" not implemented for input of dtype {input.dtype} "
                                  "(cnnops supports float32, float64, bfloat16 and float16)"
                                  f"{_QUANTIZED_HINT if input.is_quantized else ''}")


_BATCH_NORM_FORWARD = _C.op("batch_norm_forward")
_LAYER_NORM_FORWARD = _C.op("layer_norm_forward")
_GROUP_NORM_FORWARD = _C.op("group_norm_forward")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """As torch.nn.functional.batch_norm. In training, the running statistics (when given) are
    updated in place: running = (1 - momentum) * running + momentum * batch statistic, with the
    unbiased variance."""
    if not isinstance(input, torch.Tensor) and _has_torch_function((input,)):
        return _fx.handle(batch_norm, (input,), input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_tensor(input, "batch_norm")
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        return _empty_batch_norm(input, weight, bias)
    if input.dim() < 2:
        # torch counts 0 features here and fails at the first check that sees it
        for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
            if tensor is None and not training:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
            if tensor is not None and tensor.numel() != 0:
                raise RuntimeError(f"{name} should contain 0 elements not {tensor.numel()}")
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None and tensor.numel() != 0:
                raise RuntimeError(f"{name} should contain 0 elements not {tensor.numel()}")
        _check_running_stats_need_no_grad("batch_norm", running_mean, running_var)
        raise (IndexError if input.dim() == 1 else RuntimeError)(
            f"batch_norm(): expected input with at least 2 dims (N, C, *), got {input.dim()}D input of size "
            f"{list(input.shape)}")
    # in torch's order: each statistic's size (or its absence in eval), weight, bias, then the
    # kernel's checks
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
        if tensor is not None:
            _check_channel_params(input, **{name: tensor})
        elif not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    _check_channel_params(input, weight=weight, bias=bias)
    _check_running_stats_need_no_grad("batch_norm", running_mean, running_var)
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    # torch's CPU kernels read the running statistics as vectors
    if input.device.type == "cpu":
        for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
            if tensor is not None and tensor.dim() != 1:
                raise RuntimeError(f"batch_norm(): {name}: TensorAccessor expected 1 dims but tensor has "
                                   f"{tensor.dim()}")
    # torch only counts the elements of weight and bias: a (C, 1) weight is accepted
    weight, bias, running_mean, running_var = _flat_params(weight, bias, running_mean, running_var)
    args = (input, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps))
    if fast_call_ok(input, weight, bias, running_mean, running_var):
        return call(_BATCH_NORM_FORWARD, *args)[0]
    return ops.batch_norm_forward(*args)[0]


def _flat_params(*tensors):
    """Per-channel tensors as 1-d views (None stays None)."""
    return tuple(t if t is None or t.dim() == 1 else t.view(-1) for t in tensors)


def _empty_batch_norm(input, weight, bias):
    """torch's batch norm of an empty input: no statistics, no checks of the running ones; the
    output is the input scaled by weight[0] and shifted by bias[0] (so an empty weight raises
    IndexError, as in torch), keeping the gradient chain."""
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """As torch.nn.functional.layer_norm: normalizes over the trailing normalized_shape."""
    if not isinstance(input, torch.Tensor) and _has_torch_function((input,)):
        return _fx.handle(layer_norm, (input,), input, normalized_shape, weight, bias, eps)
    _check_tensor(input, "layer_norm")
    if type(normalized_shape) in (tuple, list, torch.Size) and all(type(s) is int for s in normalized_shape):
        pass  # the common case, checked without the abstract number types
    elif torch.jit.is_tracing() and isinstance(normalized_shape, (tuple, list, torch.Size)):
        normalized_shape = _untraced(normalized_shape)
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
    args = (input, normalized_shape, weight, bias, float(eps))
    if fast_call_ok(input, weight, bias):
        return call(_LAYER_NORM_FORWARD, *args)[0]
    return ops.layer_norm_forward(*args)[0]


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """As torch.nn.functional.group_norm: statistics per (sample, group of C / num_groups
    channels), affine per channel."""
    if not isinstance(input, torch.Tensor) and _has_torch_function((input,)):
        return _fx.handle(group_norm, (input,), input, num_groups, weight, bias, eps)
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
    args = (input, weight, bias, int(num_groups), float(eps))
    if fast_call_ok(input, weight, bias):
        return call(_GROUP_NORM_FORWARD, *args)[0]
    return ops.group_norm_forward(*args)[0]


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """As torch.nn.functional.instance_norm.

    use_input_stats=True: statistics per (sample, channel), i.e. group norm with one channel per
    group; running statistics, when given, are updated in place as torch does (with the
    per-channel average over the batch of the per-instance statistics). use_input_stats=False:
    normalizes with the running statistics, a per-channel scale and shift (batch norm in eval).
    """
    if not isinstance(input, torch.Tensor) and _has_torch_function((input,)):
        return _fx.handle(instance_norm, (input,), input, running_mean, running_var, weight, bias, use_input_stats,
                          momentum, eps)
    _check_tensor(input, "instance_norm")
    if use_input_stats:
        _verify_spatial_size(input.size())
    if not use_input_stats and (running_mean is None or running_var is None):
        raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
    if input.dim() == 0:  # torch reads input.size(0) and input.size(1) first
        raise IndexError("instance_norm(): Dimension specified as 0 but tensor has no dimensions")
    if input.dim() < 2:
        raise IndexError(f"instance_norm(): Dimension out of range (expected to be in range of [-1, 0], but got 1): "
                         f"expected input with at least 2 dims (N, C, *), got {input.dim()}D")
    if input.numel() == 0:
        # torch runs batch norm on the input seen as 1 x (N*C) x *: the empty case of
        # _empty_batch_norm with weight and bias repeated N times, and the running statistics set
        # to the mean over the N copies (NaN for N = 0)
        n = input.size(0)
        # torch repeats all four first (its errors for a tensor of another rank), then indexes
        weight, bias = (None if t is None else t.repeat(n) for t in (weight, bias))
        with torch.no_grad():
            for stat in (running_mean, running_var):
                if stat is not None:
                    stat.repeat(n)
        # torch then casts the statistics to the parameters' dtype (weight's, else the input's)
        # when running_mean's differs, running_var too: an absent one fails
        param_dtype = input.dtype if weight is None else weight.dtype
        if running_mean is not None and running_var is None and running_mean.dtype != param_dtype:
            raise RuntimeError("instance_norm(): Expected a proper Tensor but got None for running_var, which torch "
                               f"casts with running_mean (of dtype {running_mean.dtype}) to {param_dtype}")
        out = _empty_batch_norm(input, weight, bias)
        with torch.no_grad():
            for stat in (running_mean, running_var):
                if not use_input_stats:
                    continue  # torch only copies the statistics back when it computed them
                if stat is not None and n > 0 and stat.numel() != input.size(1):
                    raise RuntimeError(f"shape '[{n}, {input.size(1)}]' is invalid for input of size "
                                       f"{n * stat.numel()}")
                if stat is not None and n > 0:
                    # the mean of N unchanged copies, a (C,) vector copied back: fails for a 0-dim stat
                    stat.copy_(stat.reshape(-1).clone())
                if stat is not None and n == 0:
                    # torch copies back the mean over no copies: NaN, broadcast into the stat
                    stat.copy_(stat.new_full((input.size(1),), float("nan")))
        return out
    for name, tensor in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var)):
        if tensor is not None and tensor.dim() > 1:  # torch repeats each N times along its one dim
            raise RuntimeError(f"instance_norm(): {name}: Number of dimensions of repeat dims can not be smaller than "
                               f"number of dimensions of tensor (got {name} of size {list(tensor.shape)})")
    _check_channel_params(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    _check_running_stats_need_no_grad("instance_norm", running_mean, running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    # torch only counts the elements (as batch_norm)
    weight, bias, running_mean, running_var = _flat_params(weight, bias, running_mean, running_var)
    if not use_input_stats:
        if running_mean is None:
            raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
        out, _, _ = ops.batch_norm_forward(input, weight, bias, running_mean, running_var, False,
                                           float(momentum), float(eps))
        return out
    if input.is_cuda and torch.is_autocast_enabled("cuda"):
        # torch's instance norm is a batch norm, which CUDA autocast leaves in the input's dtype;
        # group_norm_forward's Autocast kernel would compute it in float32.
        with torch.autocast("cuda", enabled=False):
            out, mean, invstd = ops.group_norm_forward(input, weight, bias, input.size(1), float(eps))
    else:
        out, mean, invstd = ops.group_norm_forward(input, weight, bias, input.size(1), float(eps))
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
        batch_var = invstd.pow(-2).sub_(eps).mean(0).mul_(spatial / (spatial - 1))
        # lerp: running + m * (batch - running) = (1 - m) * running + m * batch, in place
        for running, batch in ((running_mean, batch_mean), (running_var, batch_var)):
            if abs(momentum) <= torch.finfo(running.dtype).max:
                running.lerp_(batch.to(running.dtype).view_as(running), momentum)
            else:  # a momentum the stat's dtype cannot hold: torch's m * batch + (1 - m) * running with m
                # rounded to that dtype (infinite)
                m = torch.tensor(momentum, dtype=torch.float64).to(running.dtype)
                running.copy_(batch.to(running.dtype).view_as(running) * m + running * (1 - m))
