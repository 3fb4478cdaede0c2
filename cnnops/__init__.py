"""cnnops: hand-written CPU and CUDA kernels for convolution, pooling and normalization,
as drop-in replacements for torch.nn modules and torch.nn.functional functions."""
import torch

from . import _ops  # noqa: F401  (loads the kernels; raises ImportError if not built)
from . import ao, autograd, backends, flops, functional, nn  # noqa: F401
from . import onnx  # noqa: F401  (ONNX export: cnnops/onnx.py)
from .conversion import ConvertReport, convert, revert
from .counting import Complexity, complexity
from .fuse import FuseReport, fuse_conv_bn

__version__ = "0.1.0"


def has_cuda():
    """True when the CUDA kernels were compiled into this build."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("cnnops::conv_forward", "CUDA")


__all__ = ["autograd", "backends", "functional", "nn", "convert", "revert", "ConvertReport", "complexity", "Complexity",
           "fuse_conv_bn", "FuseReport", "has_cuda", "__version__"]
