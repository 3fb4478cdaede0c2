"""cnnops.fuse_conv_bn: the fused copy against the unfused torch model in eval mode.

The reference is the unfused model run by torch in float64 (REFERENCE_DTYPE) on the same
rounded parameters and inputs; the fused copy runs in the dtype under test and is checked with
the conftest tolerance for that dtype, with the longest per-output inner product of the model's
convolutions as the reduction length. Batch norms get random running statistics and affine
parameters, so every fold is a real change of the weights.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnops
import cnnops.nn

from conftest import REFERENCE_DTYPE, assert_close_to_torch

DTYPES = [torch.float32, torch.float64]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def randomize_bn(model):
    """Running statistics and affine parameters far from the identity (seeded by conftest)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_(1, 0.3)
                    m.bias.normal_(0, 0.3)
    return model


def max_reduction(model):
    """Longest inner product a convolution of the model computes: C_in/groups x kernel volume."""
    lengths = [m.weight[0].numel() for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return max(lengths, default=1)


def prepare(model, dtype):
    return randomize_bn(model).to(dtype).eval()


def check_against_unfused(model, fused, x, dtype, msg=""):
    """fused(x) against the unfused model run by torch in the reference dtype."""
    ref_dtype = REFERENCE_DTYPE[dtype]
    reference = copy.deepcopy(model).to(ref_dtype)
    with torch.no_grad():
        expected = reference(x.detach().to(ref_dtype))
        actual = fused(x)
    assert_close_to_torch(actual, expected, dtype, max_reduction(model), msg=msg)
    return actual


def fuse(model):
    fused, report = cnnops.fuse_conv_bn(model, report=True)
    return fused, report


def module_types(model):
    return [type(m) for m in model.modules()]


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m), m.training) for n, m in model.named_modules()])


def assert_untouched(model, snap):
    state, structure = snap
    assert [(n, type(m), m.training) for n, m in model.named_modules()] == structure
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert now[k].dtype == state[k].dtype and torch.equal(now[k], state[k]), f"{k} changed"


def n_relu_fused(report):
    return sum(relu is not None for _, _, relu in report.fused)


# --------------------------------------------------------------------------------------------
# models in the style of the common architectures
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, residual add (downsample conv-bn), relu."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # one module called twice, as in torchvision
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: depthwise 3x3 (groups=C, channel multiplier 2) + BN + act, then
    pointwise 1x1 + BN + act."""

    def __init__(self, c, multiplier, cout, act):
        super().__init__()
        self.dw = nn.Conv2d(c, c * multiplier, 3, padding=1, groups=c, bias=False)
        self.bn_dw = nn.BatchNorm2d(c * multiplier)
        self.pw = nn.Conv2d(c * multiplier, cout, 1, bias=True)
        self.bn_pw = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.act(self.bn_dw(self.dw(x)))
        return self.act(self.bn_pw(self.pw(x)))


class Net1d(nn.Module):
    """Audio-style 1d net; ReLU spelled as F.relu (and F.relu inplace)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(2, 8, 9, padding=4), nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 5, stride=2, dilation=2, padding=4, padding_mode="reflect")
        self.b2 = nn.BatchNorm1d(8)
        self.pool = nn.MaxPool1d(2)

    def forward(self, x):
        x = self.pool(F.relu(self.b1(self.c1(x))))
        return F.relu(self.b2(self.c2(x)), inplace=True)


class Net3d(nn.Module):
    """Video-style 3d net; ReLU spelled as torch.relu and Tensor.relu_."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv3d(3, 6, 3, padding=1, bias=False), nn.BatchNorm3d(6)
        self.c2, self.b2 = nn.Conv3d(6, 4, (1, 3, 3), stride=(1, 2, 2)), nn.BatchNorm3d(4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        return self.b2(self.c2(x)).relu_()


# --------------------------------------------------------------------------------------------
# outputs equal the unfused model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnet_basic_block(dtype):
    model = prepare(nn.Sequential(BasicBlock(4, 8, stride=2), BasicBlock(8, 8)), dtype)
    fused, report = fuse(model)
    assert report.method == "fx"
    # conv1+bn1+relu, conv2+bn2, downsample conv+bn in the first block; two in the second.
    assert len(report.fused) == 5 and n_relu_fused(report) == 2 and report.left == []
    assert ("0.conv1", "0.bn1", "0.relu") in report.fused
    assert ("0.downsample.0", "0.downsample.1", None) in report.fused
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert type(fused.get_submodule("0.conv1")) is cnnops.nn.ConvReLU2d
    assert type(fused.get_submodule("0.conv2")) is cnnops.nn.Conv2d
    # The shared ReLU module is still called after the residual add.
    assert isinstance(fused.get_submodule("0.relu"), nn.ReLU)
    assert not fused.training and not any(m.training for m in fused.modules())
    x = torch.randn(2, 4, 12, 12, dtype=dtype)
    check_against_unfused(model, fused, x, dtype)


def test_conv_without_bias_gains_one():
    model = prepare(nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5)), torch.float32)
    fused = cnnops.fuse_conv_bn(model)
    conv = fused.get_submodule("0")
    assert type(conv) is cnnops.nn.Conv2d and conv.bias is not None and conv.bias.shape == (5,)
    assert conv.weight.dtype == conv.bias.dtype == torch.float32
    check_against_unfused(model, fused, torch.randn(2, 3, 9, 9), torch.float32)


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_depthwise_separable(dtype, multiplier):
    model = prepare(DepthwiseSeparable(6, multiplier, 10, nn.ReLU()), dtype)
    fused, report = fuse(model)
    assert [(c, b, r) for c, b, r in report.fused] == [("dw", "bn_dw", "act"), ("pw", "bn_pw", "act")]
    assert type(fused.dw) is cnnops.nn.ConvReLU2d and fused.dw.groups == 6
    assert fused.dw.out_channels == 6 * multiplier
    check_against_unfused(model, fused, torch.randn(3, 6, 11, 11, dtype=dtype), dtype)


def test_depthwise_relu6_is_not_a_relu():
    """ReLU6 is not fused (only ReLU is); the conv and batch norm still fold."""
    model = prepare(DepthwiseSeparable(4, 2, 8, nn.ReLU6()), torch.float32)
    fused, report = fuse(model)
    assert len(report.fused) == 2 and n_relu_fused(report) == 0
    assert type(fused.dw) is cnnops.nn.Conv2d and isinstance(fused.act, nn.ReLU6)
    check_against_unfused(model, fused, torch.randn(2, 4, 7, 7), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_1d_net(dtype):
    model = prepare(Net1d(), dtype)
    fused, report = fuse(model)
    assert len(report.fused) == 2 and n_relu_fused(report) == 2
    assert type(fused.c1) is cnnops.nn.ConvReLU1d and type(fused.c2) is cnnops.nn.ConvReLU1d
    assert fused.c2.padding_mode == "reflect"
    check_against_unfused(model, fused, torch.randn(2, 2, 64, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_3d_net(dtype):
    model = prepare(Net3d(), dtype)
    fused, report = fuse(model)
    assert len(report.fused) == 2 and n_relu_fused(report) == 2
    assert type(fused.c1) is cnnops.nn.ConvReLU3d and type(fused.c2) is cnnops.nn.ConvReLU3d
    check_against_unfused(model, fused, torch.randn(2, 3, 4, 8, 8, dtype=dtype), dtype)


def test_channels_last():
    model = prepare(nn.Sequential(BasicBlock(4, 8, stride=2), BasicBlock(8, 8)), torch.float32)
    model = model.to(memory_format=torch.channels_last)
    fused = cnnops.fuse_conv_bn(model)
    assert fused.get_submodule("0.conv1").weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 12, 12).contiguous(memory_format=torch.channels_last)
    out = check_against_unfused(model, fused, x, torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bn_without_affine():
    model = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU()), torch.float32)
    fused, report = fuse(model)
    assert report.fused == [("0", "1", "2")]
    check_against_unfused(model, fused, torch.randn(2, 3, 8, 8), torch.float32)


def test_cnnops_modules_and_padding_modes():
    """cnnops.nn convs and batch norms fold too (they are fx leaves); 'same' and circular
    padding are kept."""
    model = prepare(nn.Sequential(
        cnnops.nn.Conv2d(3, 4, 4, padding="same"), cnnops.nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), cnnops.nn.BatchNorm2d(4),
    ), torch.float32)
    fused, report = fuse(model)
    assert report.fused == [("0", "1", "2"), ("3", "4", None)]
    assert fused.get_submodule("0").padding == "same" and fused.get_submodule("3").padding_mode == "circular"
    check_against_unfused(model, fused, torch.randn(2, 3, 9, 9), torch.float32)


def test_sync_batch_norm_in_eval_folds():
    model = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)), torch.float32)
    fused, report = fuse(model)
    assert len(report.fused) == 1
    check_against_unfused(model, fused, torch.randn(2, 3, 8, 8), torch.float32)


# --------------------------------------------------------------------------------------------
# the Sequential fallback
# --------------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    """fx cannot trace `if x.mean() > 0`: the Sequential fallback must do the folding."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU())
        self.head = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(8))  # no conv before it

    def forward(self, x):
        branch_a = x.mean() > 0
        x = self.stem(x)
        x = self.a(x) if branch_a else self.b(x)
        return self.head(x)


def test_data_dependent_control_flow_uses_sequential_fallback():
    model = prepare(DataDependent(), torch.float32)
    fused, report = fuse(model)
    assert report.method == "sequential" and report.trace_error
    assert report.fused == [("stem.0", "stem.1", "stem.2"), ("a.0", "a.1", None)]
    assert [name for name, _ in report.left] == ["b.1", "head.1"]
    assert "track_running_stats" in report.left[0][1]
    assert type(fused) is DataDependent
    assert type(fused.stem[0]) is cnnops.nn.ConvReLU2d
    assert isinstance(fused.stem[1], nn.Identity) and isinstance(fused.stem[2], nn.Identity)
    assert type(fused.a[0]) is cnnops.nn.Conv2d and isinstance(fused.a[1], nn.Identity)
    assert isinstance(fused.b[1], nn.BatchNorm2d) and isinstance(fused.head[1], nn.BatchNorm2d)
    # state_dict keys of the untouched layers stay where they were (Identity keeps the indices)
    assert "head.1.running_mean" in fused.state_dict() and "b.2" in dict(fused.named_modules())
    x = torch.randn(2, 3, 8, 8)
    for shift, branch in ((1.0, "a"), (-1.0, "b")):
        check_against_unfused(model, fused, x + shift, torch.float32, msg=f"branch {branch}")


def test_sequential_fallback_skips_a_shared_conv():
    """The same conv object in two places: folding would change the other place too."""
    model = DataDependent()
    model.a[0] = model.stem[0] = nn.Conv2d(8, 8, 3, padding=1)
    model.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), model.a[0], nn.BatchNorm2d(8))
    model = prepare(model, torch.float32)
    fused, report = fuse(model)
    assert report.method == "sequential" and report.fused == []
    assert ("stem.3", "conv 'stem.2' appears at more than one place in the model") in report.left
    for shift in (1.0, -1.0):
        check_against_unfused(model, fused, torch.randn(2, 3, 8, 8) + shift, torch.float32)


# --------------------------------------------------------------------------------------------
# what must not be folded
# --------------------------------------------------------------------------------------------


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y  # the conv output is also used outside the batch norm
        w = self.bn2(self.conv2(z))
        return F.relu(w) + w  # the batch norm output is used beside the ReLU: no ReLU fusion


def test_conv_output_used_elsewhere_is_not_folded():
    model = prepare(ConvUsedTwice(), torch.float32)
    fused, report = fuse(model)
    assert report.fused == [("conv2", "bn2", None)]
    assert len(report.left) == 1 and report.left[0][0] == "bn" and "also used" in report.left[0][1]
    assert isinstance(fused.bn, nn.BatchNorm2d) and type(fused.conv) is nn.Conv2d
    check_against_unfused(model, fused, torch.randn(2, 3, 8, 8), torch.float32)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))  # the second call must keep the original weights


def test_conv_called_twice_is_not_folded():
    model = prepare(SharedConv(), torch.float32)
    fused, report = fuse(model)
    assert report.fused == [] and "more than one place" in report.left[0][1]
    check_against_unfused(model, fused, torch.randn(2, 4, 6, 6), torch.float32)


class ReadsConvWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.mean()  # folding would change this weight


def test_conv_weight_read_elsewhere_is_not_folded():
    model = prepare(ReadsConvWeight(), torch.float32)
    fused, report = fuse(model)
    assert report.fused == [] and "more than one place" in report.left[0][1]
    check_against_unfused(model, fused, torch.randn(2, 3, 6, 6), torch.float32)


def test_batch_norm_without_running_stats_left_alone():
    model = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()),
                    torch.float32)
    fused, report = fuse(model)
    assert report.fused == [] and report.left[0][0] == "1" and "track_running_stats" in report.left[0][1]
    assert isinstance(fused.get_submodule("1"), nn.BatchNorm2d)
    check_against_unfused(model, fused, torch.randn(4, 3, 8, 8), torch.float32)


def test_no_conv_before_batch_norm():
    """A conv, a flatten, then BatchNorm1d: no pair."""
    model = prepare(nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(24)), torch.float32)
    fused, report = fuse(model)
    assert report.fused == [] and report.left == [("2", "not preceded by a plain convolution")]
    check_against_unfused(model, fused, torch.randn(5, 3, 8), torch.float32)


def test_channel_or_dimension_mismatch_left_alone():
    """Models torch itself rejects at run time stay that way: nothing is folded, and the
    fused copy raises what the original raises."""
    for model, reason in ((nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)), "channel mismatch"),
                          (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm3d(4)), "dimension mismatch")):
        model = prepare(model, torch.float32)
        fused, report = fuse(model)
        assert report.fused == [] and reason in report.left[0][1]
        x = torch.randn(2, 3, 8, 8)
        with pytest.raises((RuntimeError, ValueError)) as expected:
            model(x)
        with pytest.raises(type(expected.value)):
            fused(x)


# --------------------------------------------------------------------------------------------
# the original model, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: nn.Sequential(BasicBlock(3, 8, stride=2), BasicBlock(8, 8)), DataDependent],
                         ids=["fx", "sequential"])
def test_original_model_untouched(make):
    model = prepare(make(), torch.float32)
    snap = snapshot(model)
    types = module_types(model)
    params = [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    fused = cnnops.fuse_conv_bn(model)
    assert_untouched(model, snap)
    assert module_types(model) == types and [id(p) for p in model.parameters()] == params
    assert not any(p is q for p in model.parameters() for q in fused.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_report_counts_and_text():
    model = prepare(nn.Sequential(BasicBlock(4, 8, stride=2), BasicBlock(8, 8)), torch.float32)
    fused, report = cnnops.fuse_conv_bn(model, report=True)
    assert isinstance(report, cnnops.FuseReport)
    text = str(report)
    assert "5 conv+bn folded, 2 with ReLU, 0 batch norm left" in text and "0.conv1 + 0.bn1 + 0.relu" in text
    assert isinstance(cnnops.fuse_conv_bn(model), nn.Module)  # report=False: the model alone


def test_training_mode_raises_and_leaves_model_untouched():
    model = randomize_bn(nn.Sequential(BasicBlock(4, 8), BasicBlock(8, 8)))  # training mode
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"eval mode.*the model \(Sequential\) is in training mode"):
        cnnops.fuse_conv_bn(model)
    assert_untouched(model, snap)

    model.eval()
    model[1].bn2.train()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"submodule '1\.bn2' \(BatchNorm2d\) is in training mode"):
        cnnops.fuse_conv_bn(model)
    assert_untouched(model, snap)


@pytest.mark.parametrize("bad", [None, "model", torch.randn(3), [nn.Conv2d(1, 1, 1)]], ids=repr)
def test_not_a_module_raises_type_error(bad):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, but got"):
        cnnops.fuse_conv_bn(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_half_precision_fold_rounds_once(dtype):
    """The fold runs in float64 and the folded weights are rounded to the conv's dtype once,
    so a bfloat16 model stays within the bfloat16 tolerance of torch's float32 reference."""
    model = prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)), dtype)
    fused = cnnops.fuse_conv_bn(model)
    assert fused.get_submodule("0").weight.dtype == fused.get_submodule("0").bias.dtype == dtype
    check_against_unfused(model, fused, torch.randn(2, 3, 8, 8).to(dtype), dtype)


def test_fusing_twice_changes_nothing_more():
    model = prepare(nn.Sequential(BasicBlock(4, 8, stride=2)), torch.float32)
    once = cnnops.fuse_conv_bn(model)
    twice, report = cnnops.fuse_conv_bn(once, report=True)
    assert report.method == "fx" and report.fused == [] and report.left == []
    check_against_unfused(model, twice, torch.randn(2, 4, 8, 8), torch.float32)


def test_convert_after_fuse():
    """cnnops.convert on the fused GraphModule swaps what is left (pools here) in place."""
    model = prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1)), torch.float32)
    fused, report = cnnops.convert(cnnops.fuse_conv_bn(model), report=True)
    assert [name for name, _, _ in report.replaced] == ["3", "6"]
    assert type(fused.get_submodule("3")) is cnnops.nn.MaxPool2d
    check_against_unfused(model, fused, torch.randn(2, 3, 10, 10), torch.float32)


def test_folded_conv1d_refuses_unbatched_input():
    """BatchNorm1d reads a (C_out, L) conv output as L features: the fold cannot reproduce that,
    so the fused conv raises rather than answer differently from the original."""
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4)).eval()
    fused = cnnops.fuse_conv_bn(model)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    model(x[0])  # torch runs it (normalizing over the wrong dim, with L == C_out == 4)
    with pytest.raises(NotImplementedError, match="batched"):
        fused(x[0])
