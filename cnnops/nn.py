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


__all__ += ["ConvReLU1d", "ConvReLU2d", "ConvReLU3d"]


class _CnnopsConvReLU:
    """relu(conv(x)) as one cnnops op: the convolution kernels apply the ReLU as they write each
    output value (conv_forward's activation="relu"), so there is no second pass over the output.
    Same constructor, parameters and state_dict as the torch.nn.ConvNd it extends."""

    _dims = None

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

    def forward(self, input):
        return type(self)._cnnops_pool(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                       ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MaxPool1d(_CnnopsMaxPool, torch.nn.MaxPool1d):
    """As torch.nn.MaxPool1d."""

    _cnnops_pool = staticmethod(CF.max_pool1d)


class MaxPool2d(_CnnopsMaxPool, torch.nn.MaxPool2d):
    """As torch.nn.MaxPool2d."""

    _cnnops_pool = staticmethod(CF.max_pool2d)


class MaxPool3d(_CnnopsMaxPool, torch.nn.MaxPool3d):
    """As torch.nn.MaxPool3d."""

    _cnnops_pool = staticmethod(CF.max_pool3d)


class AvgPool1d(torch.nn.AvgPool1d):
    """As torch.nn.AvgPool1d."""

    def forward(self, input):
        return CF.avg_pool1d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad)


class AvgPool2d(torch.nn.AvgPool2d):
    """As torch.nn.AvgPool2d."""

    def forward(self, input):
        return CF.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad, self.divisor_override)


class AvgPool3d(torch.nn.AvgPool3d):
    """As torch.nn.AvgPool3d."""

    def forward(self, input):
        return CF.avg_pool3d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool1d(torch.nn.AdaptiveAvgPool1d):
    """As torch.nn.AdaptiveAvgPool1d."""

    def forward(self, input):
        return CF.adaptive_avg_pool1d(input, self.output_size)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    """As torch.nn.AdaptiveAvgPool2d."""

    def forward(self, input):
        return CF.adaptive_avg_pool2d(input, self.output_size)


class AdaptiveAvgPool3d(torch.nn.AdaptiveAvgPool3d):
    """As torch.nn.AdaptiveAvgPool3d."""

    def forward(self, input):
        return CF.adaptive_avg_pool3d(input, self.output_size)


class AdaptiveMaxPool1d(torch.nn.AdaptiveMaxPool1d):
    """As torch.nn.AdaptiveMaxPool1d."""

    def forward(self, input):
        return CF.adaptive_max_pool1d(input, self.output_size, self.return_indices)


class AdaptiveMaxPool2d(torch.nn.AdaptiveMaxPool2d):
    """As torch.nn.AdaptiveMaxPool2d."""

    def forward(self, input):
        return CF.adaptive_max_pool2d(input, self.output_size, self.return_indices)


class AdaptiveMaxPool3d(torch.nn.AdaptiveMaxPool3d):
    """As torch.nn.AdaptiveMaxPool3d."""

    def forward(self, input):
        return CF.adaptive_max_pool3d(input, self.output_size, self.return_indices)


class _CnnopsMaxUnpool:
    _cnnops_unpool = None

    def forward(self, input, indices, output_size=None):
        return type(self)._cnnops_unpool(input, indices, self.kernel_size, self.stride, self.padding, output_size)


class MaxUnpool1d(_CnnopsMaxUnpool, torch.nn.MaxUnpool1d):
    """As torch.nn.MaxUnpool1d."""

    _cnnops_unpool = staticmethod(CF.max_unpool1d)


class MaxUnpool2d(_CnnopsMaxUnpool, torch.nn.MaxUnpool2d):
    """As torch.nn.MaxUnpool2d."""

    _cnnops_unpool = staticmethod(CF.max_unpool2d)


class MaxUnpool3d(_CnnopsMaxUnpool, torch.nn.MaxUnpool3d):
    """As torch.nn.MaxUnpool3d."""

    _cnnops_unpool = staticmethod(CF.max_unpool3d)
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
