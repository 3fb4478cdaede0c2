"""cnnops.convert on models in the style of the common architectures: a converted copy must
give the same outputs, input and parameter gradients and running statistics as the torch.nn
original, step after step, in train and in eval mode. Expected values come from the torch.nn
model; the cnnops model is a deep copy of it, converted."""
import copy

import pytest
import torch
import torch.nn as nn

import cnnops
from cnnops.conversion import SUPPORTED

# ---------------------------------------------------------------------------------------------
# Models written in the style of the common architectures
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 projection shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet(-Xt) bottleneck: 1x1 reduce, grouped 3x3 (stride 2), 1x1 expand, BN momentum=None."""

    def __init__(self, cin, width, cout, groups):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 2, 1, groups=groups, bias=False), nn.BatchNorm2d(width, momentum=None),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.down = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
                                  nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.down(x))


def mobilenet_block(c, multiplier):
    """Depthwise-separable: depthwise 3x3 with a channel multiplier (groups=c, c*m outputs),
    then pointwise 1x1; ReLU6 as in MobileNet."""
    return nn.Sequential(
        nn.Conv2d(c, c * multiplier, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c * multiplier), nn.ReLU6(),
        nn.Conv2d(c * multiplier, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6(),
        nn.Conv2d(2 * c, 2 * c, 5, 2, 2, groups=2 * c), nn.BatchNorm2d(2 * c, affine=False),
    )


class DenseBlock(nn.Module):
    """DenseNet: each layer (BN-ReLU-1x1-BN-ReLU-3x3) sees the concatenation of all before it;
    a transition (BN-ReLU-1x1-avg pool 2) halves the resolution."""

    def __init__(self, c, growth, layers):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(),
                          nn.Conv2d(c + i * growth, 2 * growth, 1, bias=False),
                          nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False))
            for i in range(layers))
        total = c + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(total), nn.ReLU(), nn.Conv2d(total, total // 2, 1, bias=False),
                                        nn.AvgPool2d(2, 2))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.transition(torch.cat(features, 1))


class Stem(nn.Module):
    """GoogLeNet stem (7x7 s2, max pool 3 s2 ceil_mode) followed by a SqueezeNet fire module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, ceil_mode=True))
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.expand1 = nn.Conv2d(4, 8, 1)
        self.expand3 = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        s = torch.relu(self.squeeze(self.stem(x)))
        y = torch.cat([torch.relu(self.expand1(s)), torch.relu(self.expand3(s))], 1)
        return self.head(self.pool(y))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, LayerNorm over channels (channels-last), inverted MLP, layer
    scale, residual; downsampling by LayerNorm + strided 2x2 conv."""

    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.down_norm = nn.LayerNorm(c, eps=1e-6)
        self.down = nn.Conv2d(c, 2 * c, 2, 2)
        self.pool_norm = nn.GroupNorm(1, 2 * c)  # a channels-first "LayerNorm" over (C, H, W)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        x = x + (self.gamma * self.mlp(self.norm(y))).permute(0, 3, 1, 2)
        x = self.down_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.pool_norm(self.down(x))


class UNetEncoder(nn.Module):
    """U-Net style encoder-decoder in the SegNet manner: max pool keeps its argmax indices and
    max unpool puts the decoder's values back where the maxima were; instance norm with
    running statistics."""

    def __init__(self, c):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1),
                                  nn.InstanceNorm2d(c, affine=True, track_running_stats=True), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2, 2, return_indices=True)
        self.enc2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2, 2, return_indices=True)
        self.bottom = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, padding_mode="reflect"), nn.ReLU())
        self.unpool2 = nn.MaxUnpool2d(2, 2)
        self.dec2 = nn.Sequential(nn.Conv2d(4 * c, c, 3, padding=1), nn.GroupNorm(2, c), nn.ReLU())
        self.unpool1 = nn.MaxUnpool2d(2, 2)
        self.dec1 = nn.Conv2d(2 * c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        p1, i1 = self.pool1(e1)
        e2 = self.enc2(p1)
        p2, i2 = self.pool2(e2)
        b = self.bottom(p2)
        d2 = self.dec2(torch.cat([self.unpool2(b, i2, output_size=e2.shape), e2], 1))
        return self.dec1(torch.cat([self.unpool1(d2, i1, output_size=e1.shape), e1], 1))


def audio_net():
    """1d: strided and dilated Conv1d, BatchNorm1d, max/avg/adaptive pools, GroupNorm,
    InstanceNorm1d, circular padding."""
    return nn.Sequential(
        nn.Conv1d(2, 8, 9, stride=4, padding=4), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(3, 2, padding=1),
        nn.Conv1d(8, 8, 3, padding=2, dilation=2, padding_mode="circular"), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.AvgPool1d(3, 2, padding=1), nn.Conv1d(8, 12, 3, groups=4), nn.InstanceNorm1d(12), nn.ReLU(),
        nn.AdaptiveMaxPool1d(5), nn.Conv1d(12, 6, 1), nn.BatchNorm1d(6, track_running_stats=False),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def video_net():
    """3d: a (3, 7, 7) spatio-temporal stem, BatchNorm3d, MaxPool3d, grouped Conv3d,
    InstanceNorm3d, AvgPool3d, adaptive pools."""
    return nn.Sequential(
        nn.Conv3d(3, 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), nn.BatchNorm3d(8), nn.ReLU(),
        nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        nn.Conv3d(8, 8, 3, padding=1, groups=2), nn.InstanceNorm3d(8, affine=True), nn.ReLU(),
        nn.AvgPool3d(2, ceil_mode=True), nn.AdaptiveMaxPool3d((2, 2, 2)), nn.Conv3d(8, 4, 1),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3),
    )


# name -> (model factory, input shape)
MODELS = {
    "resnet_basic": (lambda: nn.Sequential(BasicBlock(3, 8, 2), BasicBlock(8, 8, 1)), (4, 3, 15, 17)),
    "resnet_bottleneck": (lambda: Bottleneck(8, 8, 16, groups=4), (3, 8, 13, 11)),
    "mobilenet": (lambda: mobilenet_block(4, 3), (4, 4, 12, 13)),
    "densenet": (lambda: DenseBlock(6, 4, 3), (3, 6, 10, 10)),
    "googlenet_stem": (Stem, (3, 3, 33, 29)),
    "convnext": (lambda: ConvNeXtBlock(8), (2, 8, 10, 14)),
    "unet": (lambda: UNetEncoder(4), (2, 3, 16, 20)),
    "audio_1d": (audio_net, (3, 2, 401)),
    "video_3d": (video_net, (2, 3, 5, 22, 18)),
    # torch.nn.SyncBatchNorm outside a process group normalizes like BatchNorm, on the CPU too
    "resnet_sync_bn": (lambda: nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(BasicBlock(3, 8, 2))),
                       (4, 3, 9, 11)),
}


def _pair(name, dtype=torch.float64):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    reference = factory().to(dtype)
    converted = cnnops.convert(copy.deepcopy(reference))
    x = torch.randn(shape, dtype=dtype)
    return reference, converted, x


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def _assert_models_equal(reference, converted, atol, rtol):
    for (name, p), (_, q) in zip(reference.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(q, p, atol=atol, rtol=rtol, msg=lambda m: f"parameter {name}: {m}")
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")
    for (name, b), (_, c) in zip(reference.named_buffers(), converted.named_buffers()):
        torch.testing.assert_close(c, b, atol=atol, rtol=rtol, msg=lambda m: f"buffer {name}: {m}")


def _step(model, optimizer, x):
    x = x.clone().requires_grad_()
    optimizer.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    optimizer.step()
    return out.detach(), x.grad


def test_every_supported_module_is_converted_in_every_model():
    for name in MODELS:
        _, converted, _ = _pair(name)
        for module_name, module in converted.named_modules():
            assert type(module) not in SUPPORTED, f"{name}: {module_name} ({type(module).__name__}) was not converted"


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_converted_model_trains_like_torch(name, channels_last):
    reference, converted, x = _pair(name)
    if channels_last:
        if x.dim() not in (4, 5):
            pytest.skip("channels_last is for 4d and 5d inputs")
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt_cnn = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        out_ref, grad_ref = _step(reference, opt_ref, x + step)
        out_cnn, grad_cnn = _step(converted, opt_cnn, x + step)
        torch.testing.assert_close(out_cnn, out_ref, atol=1e-9, rtol=1e-8)
        torch.testing.assert_close(grad_cnn, grad_ref, atol=1e-9, rtol=1e-8)
        _assert_models_equal(reference, converted, atol=1e-9, rtol=1e-8)
    reference.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), atol=1e-9, rtol=1e-8)
    out_ref, grad_ref = _step(reference, opt_ref, x)
    out_cnn, grad_cnn = _step(converted, opt_cnn, x)
    torch.testing.assert_close(out_cnn, out_ref, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(grad_cnn, grad_ref, atol=1e-9, rtol=1e-8)
    _assert_models_equal(reference, converted, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("name", ["resnet_basic", "unet", "audio_1d", "video_3d"])
def test_converted_model_float32(name):
    reference, converted, x = _pair(name, torch.float32)
    out_ref, grad_ref = _step(reference, torch.optim.SGD(reference.parameters(), lr=0.01), x)
    out_cnn, grad_cnn = _step(converted, torch.optim.SGD(converted.parameters(), lr=0.01), x)
    torch.testing.assert_close(out_cnn, out_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_cnn, grad_ref, atol=1e-4, rtol=1e-4)
    _assert_models_equal(reference, converted, atol=1e-4, rtol=1e-4)


def test_same_parameter_and_buffer_objects_and_optimizer_keeps_working():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    params, buffers = list(model.parameters()), list(model.buffers())
    modules = list(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hook_calls = []
    model[0].register_forward_hook(lambda *args: hook_calls.append(1))

    assert cnnops.convert(model) is model
    assert [type(m) for m in model] == [cnnops.nn.Conv2d, cnnops.nn.BatchNorm2d, nn.ReLU, cnnops.nn.MaxPool2d]
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(a is b for a, b in zip(model.buffers(), buffers))
    assert all(a is b for a, b in zip(model, modules))
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])

    before = model[0].weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before), "the optimizer built before convert must update the weights"
    assert hook_calls == [1], "hooks registered before convert keep running"


def test_training_flag_device_and_dtype_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(torch.float64)
    model[1].eval()
    cnnops.convert(model)
    assert model.training and not model[1].training
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())


def test_subclasses_and_other_modules_are_left_and_reported():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(MyConv(3, 4, 3), shared, nn.ReLU(), nn.Sequential(shared), cnnops.nn.MaxPool2d(2))
    _, report = cnnops.convert(model, report=True)
    assert type(model[0]) is MyConv
    assert type(shared) is cnnops.nn.BatchNorm2d and model[3][0] is shared
    assert report.replaced == [("1", "torch.nn.BatchNorm2d", "cnnops.nn.BatchNorm2d")]
    left = {name: (kind, reason) for name, kind, reason in report.left}
    assert left["0"][0] == "MyConv" and "subclass of torch.nn.Conv2d" in left["0"][1]
    assert left["2"] == ("ReLU", "no cnnops twin; torch runs it")
    assert left["4"] == ("MaxPool2d", "already cnnops")
    text = str(report)
    assert "1 replaced" in text and "torch.nn.BatchNorm2d -> cnnops.nn.BatchNorm2d" in text and "MyConv" in text


def test_converting_twice_changes_nothing():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.GroupNorm(1, 3))
    cnnops.convert(model)
    _, report = cnnops.convert(model, report=True)
    assert report.replaced == [] and all(reason == "already cnnops" for *_, reason in report.left)


def test_model_itself_can_be_a_supported_module():
    conv = nn.Conv2d(1, 1, 1)
    assert cnnops.convert(conv) is conv and type(conv) is cnnops.nn.Conv2d


@pytest.mark.parametrize("bad", [3, "model", [nn.Conv2d(1, 1, 1)], nn.Conv2d])
def test_not_a_module_raises_type_error(bad):
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        cnnops.convert(bad)


def test_script_module_is_refused_untouched():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(TypeError, match="TorchScript"):
        cnnops.convert(scripted)


@pytest.mark.parametrize("name", ["resnet_basic", "unet"])
def test_converted_model_compiles_with_fullgraph(name):
    reference, converted, x = _pair(name)
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    x_ref, x_cnn = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_cnn = reference(x_ref), compiled(x_cnn)
    torch.testing.assert_close(out_cnn, out_ref, atol=1e-9, rtol=1e-8)
    out_ref.sum().backward()
    out_cnn.sum().backward()
    torch.testing.assert_close(x_cnn.grad, x_ref.grad, atol=1e-9, rtol=1e-8)
    _assert_models_equal(reference, converted, atol=1e-9, rtol=1e-8)
