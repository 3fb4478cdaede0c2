"""What cnnops.nn modules run under torch.jit.script: TorchScript functions calling the ops.

Each cnnops.nn forward has a `torch.jit.is_scripting()` branch calling these (TorchScript
compiles only that branch); eager mode never runs them. They do what cnnops.functional does
for module arguments (resolved window arguments, unbatched input, torch's Python-level
checks); the ops check the rest in C++. A scripted model calls torch.ops.cnnops.*, so loading
it needs `import cnnops` first.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def ints(values: list[int], dims: int) -> list[int]:
    """One value per spatial dim (a single value repeated), as the ops take them."""
    if len(values) == 1:
        return [values[0] for _ in range(dims)]
    return values


def conv(input: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
         dilation: list[int], groups: int, activation: str) -> Tensor:
    unbatched = input.dim() == weight.dim() - 1
    if unbatched:
        input = input.unsqueeze(0)
    out = torch.ops.cnnops.conv_forward(input, weight, bias, stride, padding, dilation, groups, activation)
    if unbatched:
        out = out.squeeze(0)
    return out


def _batched(input: Tensor, dims: int) -> tuple[Tensor, bool]:
    if input.dim() == dims + 1:
        return input.unsqueeze(0), True
    return input, False


def max_pool(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
             ceil_mode: bool, dims: int) -> tuple[Tensor, Tensor]:
    kernel_size = ints(kernel_size, dims)
    stride = kernel_size if len(stride) == 0 else ints(stride, dims)
    x, unbatched = _batched(input, dims)
    out, indices = torch.ops.cnnops.max_pool_forward(x, kernel_size, stride, ints(padding, dims),
                                                     ints(dilation, dims), ceil_mode)
    if unbatched:
        return out.squeeze(0), indices.squeeze(0)
    return out, indices


def avg_pool(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
             count_include_pad: bool, divisor_override: int | None, dims: int) -> Tensor:
    kernel_size = ints(kernel_size, dims)
    stride = kernel_size if len(stride) == 0 else ints(stride, dims)
    divisor = 0  # the op's "none"
    if divisor_override is not None:
        if divisor_override == 0:
            raise RuntimeError("divisor must be not zero")
        divisor = divisor_override
    x, unbatched = _batched(input, dims)
    out = torch.ops.cnnops.avg_pool_forward(x, kernel_size, stride, ints(padding, dims), ceil_mode,
                                            count_include_pad, divisor)
    if unbatched:
        out = out.squeeze(0)
    return out


def adaptive_pool(input: Tensor, output_size: list[int], dims: int, maximum: bool) -> tuple[Tensor, Tensor]:
    """(output, indices) of the adaptive max pool, (output, output) of the adaptive avg pool."""
    sizes = ints(output_size, dims)
    x, unbatched = _batched(input, dims)
    if maximum:
        out, indices = torch.ops.cnnops.adaptive_max_pool_forward(x, sizes)
    else:
        out = torch.ops.cnnops.adaptive_avg_pool_forward(x, sizes)
        indices = out
    if unbatched:
        return out.squeeze(0), indices.squeeze(0)
    return out, indices


def max_unpool(input: Tensor, indices: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
               output_size: list[int] | None, dims: int) -> Tensor:
    kernel_size = ints(kernel_size, dims)
    stride = kernel_size if len(stride) == 0 else ints(stride, dims)
    sizes = F._unpool_output_size(input, kernel_size, stride, ints(padding, dims), output_size)
    x, unbatched = _batched(input, dims)
    if unbatched:
        indices = indices.unsqueeze(0)
    out = torch.ops.cnnops.max_unpool_forward(x, indices, sizes)
    if unbatched:
        out = out.squeeze(0)
    return out


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
               eps: float) -> Tensor:
    if training:
        F._verify_batch_size(input.size())
    return torch.ops.cnnops.batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum,
                                               eps)[0]


def instance_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                  weight: Tensor | None, bias: Tensor | None, use_input_stats: bool, momentum: float,
                  eps: float) -> Tensor:
    """cnnops.functional.instance_norm: group norm with a group per channel; running statistics
    updated with the batch mean of the per-instance statistics (unbiased variance)."""
    if not use_input_stats:
        return torch.ops.cnnops.batch_norm_forward(input, weight, bias, running_mean, running_var, False, momentum,
                                                   eps)[0]
    F._verify_spatial_size(input.size())
    out, mean, invstd = torch.ops.cnnops.group_norm_forward(input, weight, bias, input.size(1), eps)
    if running_mean is not None and running_var is not None:
        spatial = 1
        for size in input.shape[2:]:
            spatial *= size
        with torch.no_grad():
            batch_mean = mean.mean(0)
            batch_var = (invstd.pow(-2) - eps).mean(0) * (spatial / (spatial - 1))
            running_mean.lerp_(batch_mean.to(running_mean.dtype), momentum)
            running_var.lerp_(batch_var.to(running_var.dtype), momentum)
    return out


def layer_norm(input: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    return torch.ops.cnnops.layer_norm_forward(input, normalized_shape, weight, bias, eps)[0]


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    if input.dim() < 2:
        raise RuntimeError("Expected at least 2 dimensions for input tensor")
    F._verify_batch_size([input.size(0) * input.size(1) // num_groups, num_groups] + input.size()[2:])
    return torch.ops.cnnops.group_norm_forward(input, weight, bias, num_groups, eps)[0]
