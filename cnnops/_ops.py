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


def conv_output_size(size, kernel, stride, padding, dilation):
    """Slides: H' = (H - K + 2P) / S + 1, with a dilated kernel spanning D(K - 1) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_memory_format(input, weight):
    """The C++ kernels' rule (as torch's): channels_last out if input or weight suggests it."""
    if input.dim() not in (4, 5):
        return torch.contiguous_format
    channels_last = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    if channels_last in (suggest_memory_format(input), suggest_memory_format(weight)):
        return channels_last
    return torch.contiguous_format


@torch.library.register_fake("cnnops::conv_forward")
def _conv_forward_fake(input, weight, bias, stride, padding, dilation, groups):
    dims = weight.dim() - 2
    torch._check(input.dim() == dims + 2, lambda: f"input: expected {dims + 2}D input, got {input.dim()}D")
    torch._check(input.size(1) == weight.size(1) * groups, lambda: "input channels do not match weight")
    torch._check_not_implemented(input.size(1) > 0, lambda: "cnnops conv: an input with zero channels is not supported")
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

    grad_input = input.new_empty(input.shape).contiguous(memory_format=_conv_memory_format(input, input)) if output_mask[0] else empty()
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else empty()
    grad_bias = input.new_empty([weight.size(0)]) if output_mask[2] else empty()
    return grad_input, grad_weight, grad_bias
