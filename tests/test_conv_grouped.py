"""Grouped convolutions with narrow groups (RegNet's 8 channels a group, ResNeXt's 4 to 32), against
torch: these take their own routes on the CPU (csrc/cpu/conv.cpp kernel_memory_format,
conv_shifted.h use_shifted_grid, conv_winograd.cpp use_winograd): channels-last inputs run the
NCHW kernels and come back channels-last, stride-1 layers run on the shifted grid down to 7x7 maps,
and Winograd needs 64 channels a group. Forward and every gradient, every expected value from
torch.
"""

import pytest
import torch
from conftest import check_conv_against_torch, conv_tensors, dtype_id

DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (14, 14), (9, 13), (3, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("per_group,groups", [(8, 6), (4, 8), (16, 3), (32, 2)], ids=str)
def test_narrow_groups(per_group, groups, size, stride, dtype, layout):
    c = per_group * groups
    x, w, b = conv_tensors(2, 2, c, c, size, 3, groups, True, dtype, layout)
    check_conv_against_torch(2, x, w, b, {"stride": stride, "padding": 1, "groups": groups}, dtype,
                             grad_layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_regnet_block_widths(layout):
    """RegNetY-400MF's grouped 3x3 layers at batch 1: 48 channels at 56x56 stride 1 and 104 at
    stride 2 (group width 8)."""
    for c, size, stride in [(48, 56, 1), (104, 56, 2)]:
        x, w, b = conv_tensors(2, 1, c, c, size, 3, c // 8, False, torch.float32, layout)
        check_conv_against_torch(2, x, w, b, {"stride": stride, "padding": 1, "groups": c // 8}, torch.float32,
                                 grad_layout=layout)
