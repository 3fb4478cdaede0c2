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
