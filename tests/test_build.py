"""The build itself: version, CUDA kernels present when they were asked for, the ISA dispatch."""
import os

import cnnops
import torch


def test_version():
    assert isinstance(cnnops.__version__, str) and cnnops.__version__.count(".") == 2


def test_cuda_kernels_compiled_when_forced():
    """CI builds with CNNOPS_CUDA=1: the CUDA kernels must then really be registered."""
    forced = os.environ.get("CNNOPS_CUDA") == "1"
    if forced:
        assert cnnops.has_cuda()
    assert cnnops.has_cuda() == torch._C._dispatch_has_kernel_for_dispatch_key("cnnops::conv_backward", "CUDA")


def test_every_op_has_cpu_and_fake_kernels():
    for op in ("conv_forward", "conv_backward"):
        name = f"cnnops::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")
