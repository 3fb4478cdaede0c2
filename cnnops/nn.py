"""Drop-in replacements for torch.nn modules.

Each module subclasses its torch.nn twin, so the constructor, parameter and buffer names,
initialisation, state_dict and repr are torch's own; only the computation is cnnops'.
"""
import torch

from . import functional as CF

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


class _CnnopsConv:
    """Routes torch.nn.ConvNd's forward through cnnops. Non-zero padding modes pad with F.pad
    first, exactly as torch.nn.ConvNd does."""

    _cnnops_conv = None  # the cnnops.functional function for this dim

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


# ============================================================================================
# Normalization
# ============================================================================================
# Subclasses of the torch.nn norm modules: constructor, parameters (weight, bias), buffers
# (running_mean, running_var, num_batches_tracked), state_dict and train/eval are torch's own;
# forward runs cnnops.functional with the same decisions torch's forward makes.

__all__ += ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
            "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _CnnopsBatchNorm:
    """torch.nn.modules.batchnorm._BatchNorm.forward, step for step, with cnnops' batch_norm."""

    def forward(self, input):
        self._check_input_dim(input)
        # momentum=None: cumulative moving average, factor 1 / (number of batches seen so far).
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        # Batch statistics in training, and in eval when there are no running statistics.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # The running statistics are passed only where they are used: to be updated (training
        # and tracked) or to normalize with (eval).
        pass_running = not self.training or self.track_running_stats
        return CF.batch_norm(
            input,
            self.running_mean if pass_running else None,
            self.running_var if pass_running else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )


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

    def _apply_instance_norm(self, input):
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
        return CF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """As torch.nn.GroupNorm."""

    def forward(self, input):
        return CF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
