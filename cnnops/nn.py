"""Drop-in replacements for torch.nn modules.

Each module subclasses its torch.nn twin, so the constructor, parameter and buffer names,
initialisation, state_dict and repr are torch's own; only the computation is cnnops'.

Every forward starts with two branches, which cost eager mode two cheap checks: under
torch.jit.script (TorchScript compiles only that branch) it calls the ops through
cnnops/_script.py, and called on an FX Proxy it is recorded where its torch.nn twin would be
(cnnops/_fx.py).
"""
import warnings
from typing import Final

import torch
from torch.nn.modules.utils import _single

from . import _fx, _script
from . import functional as CF

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


class _CnnopsConv:
    """Routes torch.nn.ConvNd's forward through cnnops. Non-zero padding modes pad with F.pad
    first, exactly as torch.nn.ConvNd does."""

    _cnnops_conv = None  # the cnnops.functional function for this dim
    _cnnops_activation = "none"  # conv_forward's activation (ConvReLU: "relu")
    __constants__ = (*torch.nn.modules.conv._ConvNd.__constants__, "_cnnops_activation")

    def forward(self, input):
        if torch.jit.is_scripting():
            if isinstance(self.padding, str):  # 'same' / 'valid': torch's padding amounts, padded first
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=mode)
                padding = [0 for _ in self.kernel_size]
            elif self.padding_mode != "zeros":
                input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                padding = [0 for _ in self.kernel_size]
            else:
                padding = [p for p in self.padding]
            return _script.conv(input, self.weight, self.bias, [s for s in self.stride], padding,
                                [d for d in self.dilation], self.groups, self._cnnops_activation)
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return self._conv_forward(input, self.weight, self.bias)

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return type(self)._cnnops_conv(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return type(self)._cnnops_conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class Conv1d(_CnnopsConv, torch.nn.Conv1d):
    """As torch.nn.Conv1d."""

    _cnnops_conv = staticmethod(CF.conv1d)


class Conv2d(_CnnopsConv, torch.nn.Conv2d):
    """As torch.nn.Conv2d."""

    _cnnops_conv = staticmethod(CF.conv2d)


class Conv3d(_CnnopsConv, torch.nn.Conv3d):
    """As torch.nn.Conv3d."""

    _cnnops_conv = staticmethod(CF.conv3d)


__all__ += ["ConvReLU1d", "ConvReLU2d", "ConvReLU3d"]


class _CnnopsConvReLU:
    """relu(conv(x)) as one cnnops op: the convolution kernels apply the ReLU as they write each
    output value (conv_forward's activation="relu"), so there is no second pass over the output.
    Same constructor, parameters and state_dict as the torch.nn.ConvNd it extends."""

    _dims = None
    _cnnops_activation = "relu"

    def _conv_forward(self, input, weight, bias):
        padding = self.padding
        if self.padding_mode != "zeros":  # pad first, as torch.nn.ConvNd does
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return CF._conv(input, weight, bias, self.stride, padding, self.dilation, self.groups, self._dims,
                        _activation="relu")


class ConvReLU1d(_CnnopsConvReLU, Conv1d):
    """cnnops.nn.Conv1d followed by ReLU, fused: forward(x) = relu(conv1d(x))."""

    _dims = 1


class ConvReLU2d(_CnnopsConvReLU, Conv2d):
    """cnnops.nn.Conv2d followed by ReLU, fused: forward(x) = relu(conv2d(x))."""

    _dims = 2


class ConvReLU3d(_CnnopsConvReLU, Conv3d):
    """cnnops.nn.Conv3d followed by ReLU, fused: forward(x) = relu(conv3d(x))."""

    _dims = 3


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------
# Each module subclasses its torch.nn twin (constructor, attributes, extra_repr are torch's)
# and computes its forward with cnnops.functional.

__all__ += [
    "MaxPool1d", "MaxPool2d", "MaxPool3d",
    "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "MaxUnpool1d", "MaxUnpool2d", "MaxUnpool3d",
]


class _CnnopsMaxPool:
    _cnnops_pool = None
    _dims = 0
    __constants__ = (*torch.nn.modules.pooling._MaxPoolNd.__constants__, "_dims")

    def forward(self, input):
        if torch.jit.is_scripting():
            out, indices = _script.max_pool(input, _single(self.kernel_size), _single(self.stride),
                                            _single(self.padding), _single(self.dilation), self.ceil_mode, self._dims)
            if self.return_indices:
                return out, indices
            return out
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return type(self)._cnnops_pool(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                       ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MaxPool1d(_CnnopsMaxPool, torch.nn.MaxPool1d):
    """As torch.nn.MaxPool1d."""

    _cnnops_pool = staticmethod(CF.max_pool1d)
    _dims = 1


class MaxPool2d(_CnnopsMaxPool, torch.nn.MaxPool2d):
    """As torch.nn.MaxPool2d."""

    _cnnops_pool = staticmethod(CF.max_pool2d)
    _dims = 2


class MaxPool3d(_CnnopsMaxPool, torch.nn.MaxPool3d):
    """As torch.nn.MaxPool3d."""

    _cnnops_pool = staticmethod(CF.max_pool3d)
    _dims = 3


class AvgPool1d(torch.nn.AvgPool1d):
    """As torch.nn.AvgPool1d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return _script.avg_pool(input, _single(self.kernel_size), _single(self.stride), _single(self.padding),
                                    self.ceil_mode, self.count_include_pad, None, 1)
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.avg_pool1d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad)


class AvgPool2d(torch.nn.AvgPool2d):
    """As torch.nn.AvgPool2d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return _script.avg_pool(input, _single(self.kernel_size), _single(self.stride), _single(self.padding),
                                    self.ceil_mode, self.count_include_pad, self.divisor_override, 2)
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad, self.divisor_override)


class AvgPool3d(torch.nn.AvgPool3d):
    """As torch.nn.AvgPool3d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return _script.avg_pool(input, _single(self.kernel_size), _single(self.stride), _single(self.padding),
                                    self.ceil_mode, self.count_include_pad, self.divisor_override, 3)
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.avg_pool3d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool1d(torch.nn.AdaptiveAvgPool1d):
    """As torch.nn.AdaptiveAvgPool1d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return _script.adaptive_pool(input, _single(self.output_size), 1, False)[0]
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.adaptive_avg_pool1d(input, self.output_size)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    """As torch.nn.AdaptiveAvgPool2d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return _script.adaptive_pool(input, _single(self.output_size), 2, False)[0]
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.adaptive_avg_pool2d(input, self.output_size)


class AdaptiveAvgPool3d(torch.nn.AdaptiveAvgPool3d):
    """As torch.nn.AdaptiveAvgPool3d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return _script.adaptive_pool(input, _single(self.output_size), 3, False)[0]
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.adaptive_avg_pool3d(input, self.output_size)


class AdaptiveMaxPool1d(torch.nn.AdaptiveMaxPool1d):
    """As torch.nn.AdaptiveMaxPool1d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            out, indices = _script.adaptive_pool(input, _single(self.output_size), 1, True)
            if self.return_indices:
                return out, indices
            return out
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.adaptive_max_pool1d(input, self.output_size, self.return_indices)


class AdaptiveMaxPool2d(torch.nn.AdaptiveMaxPool2d):
    """As torch.nn.AdaptiveMaxPool2d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            out, indices = _script.adaptive_pool(input, _single(self.output_size), 2, True)
            if self.return_indices:
                return out, indices
            return out
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.adaptive_max_pool2d(input, self.output_size, self.return_indices)


class AdaptiveMaxPool3d(torch.nn.AdaptiveMaxPool3d):
    """As torch.nn.AdaptiveMaxPool3d."""

    def forward(self, input):
        if torch.jit.is_scripting():
            out, indices = _script.adaptive_pool(input, _single(self.output_size), 3, True)
            if self.return_indices:
                return out, indices
            return out
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.adaptive_max_pool3d(input, self.output_size, self.return_indices)


class _CnnopsMaxUnpool:
    _cnnops_unpool = None
    # TorchScript types attributes by the nearest class annotations; torch.nn.MaxUnpool*d's (int
    # or tuple unions) do not script (torch's own modules fail to), the values' types do. This
    # one annotation (a constant) hides them.
    _dims: Final[int] = 0

    def forward(self, input, indices, output_size: list[int] | None = None):
        if torch.jit.is_scripting():
            return _script.max_unpool(input, indices, _single(self.kernel_size), _single(self.stride),
                                      _single(self.padding), output_size, self._dims)
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input, indices), {} if output_size is None else {"output_size": output_size})
            if node is not None:
                return node
        return type(self)._cnnops_unpool(input, indices, self.kernel_size, self.stride, self.padding, output_size)


class MaxUnpool1d(_CnnopsMaxUnpool, torch.nn.MaxUnpool1d):
    """As torch.nn.MaxUnpool1d."""

    _cnnops_unpool = staticmethod(CF.max_unpool1d)
    _dims = 1


class MaxUnpool2d(_CnnopsMaxUnpool, torch.nn.MaxUnpool2d):
    """As torch.nn.MaxUnpool2d."""

    _cnnops_unpool = staticmethod(CF.max_unpool2d)
    _dims = 2


class MaxUnpool3d(_CnnopsMaxUnpool, torch.nn.MaxUnpool3d):
    """As torch.nn.MaxUnpool3d."""

    _cnnops_unpool = staticmethod(CF.max_unpool3d)
    _dims = 3
# ============================================================================================
# Normalization
# ============================================================================================
# Subclasses of the torch.nn norm modules: constructor, parameters (weight, bias), buffers
# (running_mean, running_var, num_batches_tracked), state_dict and train/eval are torch's own;
# forward runs cnnops.functional with the same decisions torch's forward makes.

__all__ += ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
            "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


def _batch_norm_step(bn):
    """torch's _BatchNorm.forward decisions, shared by BatchNorm*d and SyncBatchNorm: counts the
    batch, and returns (use batch statistics, running-average factor, running_mean,
    running_var), the running statistics only where they are used."""
    # momentum=None: cumulative moving average, factor 1 / (number of batches seen so far).
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    # Batch statistics in training, and in eval when there are no running statistics.
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    # Running statistics are passed to be updated (training and tracked) or used (eval).
    pass_running = not bn.training or bn.track_running_stats
    return (bn_training, factor, bn.running_mean if pass_running else None,
            bn.running_var if pass_running else None)


class _CnnopsBatchNorm:
    """torch.nn.modules.batchnorm._BatchNorm.forward, step for step, with cnnops' batch_norm."""

    def forward(self, input):
        if torch.jit.is_scripting():  # _batch_norm_step, in TorchScript
            self._check_input_dim(input)
            factor = 0.0 if self.momentum is None else self.momentum
            # nested as in torch: TorchScript drops the inner branch when num_batches_tracked is None
            if self.training and self.track_running_stats:  # noqa: SIM102
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                    if self.momentum is None:
                        factor = 1.0 / float(self.num_batches_tracked)
                    else:
                        factor = self.momentum
            bn_training = self.training or (self.running_mean is None and self.running_var is None)
            pass_running = not self.training or self.track_running_stats
            return _script.batch_norm(input, self.running_mean if pass_running else None,
                                      self.running_var if pass_running else None, self.weight, self.bias,
                                      bn_training, factor, self.eps)
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        self._check_input_dim(input)
        bn_training, factor, running_mean, running_var = _batch_norm_step(self)
        return CF.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps)


class BatchNorm1d(_CnnopsBatchNorm, torch.nn.BatchNorm1d):
    """As torch.nn.BatchNorm1d."""


class BatchNorm2d(_CnnopsBatchNorm, torch.nn.BatchNorm2d):
    """As torch.nn.BatchNorm2d."""


class BatchNorm3d(_CnnopsBatchNorm, torch.nn.BatchNorm3d):
    """As torch.nn.BatchNorm3d."""


class _CnnopsInstanceNorm:
    """torch.nn's _InstanceNorm.forward (input checks, the num_features warning, unbatched
    input) is kept; the normalization itself is cnnops' instance_norm, with torch's rule:
    instance statistics in training or when no running statistics are tracked."""

    def forward(self, input):
        if not isinstance(input, torch.Tensor) and not torch.jit.is_scripting():
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        # torch.nn.modules.instancenorm._InstanceNorm.forward
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}.")
            else:
                warnings.warn(
                    f"input's size at dim={feature_dim} does not match num_features. "
                    "You can silence this warning by not passing in num_features, "
                    "which is not used because affine=False", stacklevel=2)
        if input.dim() == self._get_no_batch_dim():
            return self._handle_no_batch_input(input)
        return self._apply_instance_norm(input)

    def _apply_instance_norm(self, input):
        if torch.jit.is_scripting():
            return _script.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                         self.training or not self.track_running_stats,
                                         self.momentum if self.momentum is not None else 0.0, self.eps)
        return CF.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_CnnopsInstanceNorm, torch.nn.InstanceNorm1d):
    """As torch.nn.InstanceNorm1d."""


class InstanceNorm2d(_CnnopsInstanceNorm, torch.nn.InstanceNorm2d):
    """As torch.nn.InstanceNorm2d."""


class InstanceNorm3d(_CnnopsInstanceNorm, torch.nn.InstanceNorm3d):
    """As torch.nn.InstanceNorm3d."""


class LayerNorm(torch.nn.LayerNorm):
    """As torch.nn.LayerNorm."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return _script.layer_norm(input, [s for s in self.normalized_shape], self.weight, self.bias, self.eps)
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """As torch.nn.GroupNorm."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return _script.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        return CF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


# ============================================================================================
# SyncBatchNorm
# ============================================================================================
# torch.nn.SyncBatchNorm's forward, step for step: in training inside an initialized process
# group of more than one rank, batch norm over the union of the ranks' batches
# (cnnops.autograd.SyncBatchNormFunction, CPU tensors with gloo or CUDA tensors with NCCL);
# anywhere else exactly cnnops' BatchNorm.

import inspect  # noqa: E402
from typing import Any  # noqa: E402

import torch.distributed as dist  # noqa: E402

from .autograd import SyncBatchNormFunction  # noqa: E402

__all__ += ["SyncBatchNorm"]


# torch 2.11's _BatchNorm.__init__ has no keyword-only `bias` (later versions do).
_BATCHNORM_HAS_BIAS = "bias" in inspect.signature(torch.nn.modules.batchnorm._BatchNorm.__init__).parameters


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """As torch.nn.SyncBatchNorm (constructor, process_group, state_dict, repr, errors,
    convert_sync_batchnorm), also for CPU tensors with gloo.

    It mirrors torch.nn.SyncBatchNorm instead of subclassing it, unlike the other cnnops
    modules: DistributedDataParallel refuses any torch.nn.SyncBatchNorm instance in a CPU model
    ("SyncBatchNorm layers only work with GPU modules"), which would rule out the CPU/gloo use
    this module exists for. Like torch's, it is a _BatchNorm, so torch's own
    convert_sync_batchnorm converts it (back) like any BatchNorm.
    """

    if _BATCHNORM_HAS_BIAS:
        def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                     track_running_stats: bool = True, process_group: Any | None = None, device=None, dtype=None, *,
                     bias: bool = True) -> None:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                             bias=bias)
            self.process_group = process_group
    else:  # torch without `bias=` (2.11): the same constructor as torch.nn.SyncBatchNorm there
        def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                     track_running_stats: bool = True, process_group: Any | None = None, device=None,
                     dtype=None) -> None:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
            self.process_group = process_group

    # torch's checks and messages ("expected at least 2D input (got 1D input)", ...)
    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input):
        if not isinstance(input, torch.Tensor):
            node = _fx.module_node(self, (input,))
            if node is not None:
                return node
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        bn_training, exponential_average_factor, running_mean, running_var = _batch_norm_step(self)

        # Statistics are synchronized only in training (never in eval, as torch).
        need_sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            if input.device.type not in ("cpu", "cuda"):
                raise ValueError(f"SyncBatchNorm expected input tensor to be on CPU or GPU, got {input.device.type}")
            process_group = self.process_group if self.process_group else dist.group.WORLD
            world_size = dist.get_world_size(process_group)
            need_sync = world_size > 1
        if not need_sync:
            return CF.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                 exponential_average_factor, self.eps)
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                           exponential_average_factor, process_group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """As torch.nn.SyncBatchNorm.convert_sync_batchnorm, producing cnnops.nn.SyncBatchNorm:
        every BatchNorm*d (torch's or cnnops') becomes one with the same Parameter and buffer
        objects and training flag; a BatchNorm module itself is returned converted."""
        module_output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module_output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                **({"bias": module.bias is not None} if _BATCHNORM_HAS_BIAS else {}),
            )
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output
