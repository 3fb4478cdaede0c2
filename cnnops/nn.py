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
