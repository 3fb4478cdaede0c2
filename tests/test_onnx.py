"""ONNX export of converted models (cnnops/onnx.py): both of torch's exporters give a standard graph
(no cnnops domain) that onnx.checker accepts and ONNX Runtime runs with torch.nn's outputs."""
import copy
import io

import pytest
import torch
from torch import nn

import cnnops

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]

pytestmark = [
    # torch 2.9+ warns on every TorchScript-exporter call; the tracer warns where cnnops.functional
    # checks sizes in Python (constants in the trace, as in torch.nn.functional)
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]



def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)

def _export(model, args, dynamo, full_check=True, **kwargs):
    f = io.BytesIO()
    if dynamo:
        kwargs.setdefault("verbose", False)
    torch.onnx.export(model, args, f, dynamo=dynamo, **kwargs)
    proto = onnx.load_from_string(f.getvalue())
    onnx.checker.check_model(proto, full_check=full_check)
    return proto


def _op_types(proto):
    types = set()
    for node in proto.graph.node:
        types.add(node.op_type)
        assert node.domain in ("", "ai.onnx"), f"non-standard node {node.domain}::{node.op_type}"
    for function in proto.functions:
        for node in function.node:
            types.add(node.op_type)
    for opset in proto.opset_import:
        assert opset.domain in ("", "ai.onnx", "pkg.onnxscript.torch_lib.common"), proto.opset_import
    return types


def _run(proto, *inputs):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})


def _check(reference, model, inputs, dynamo, expect_ops=(), full_check=True, **export_kwargs):
    """Exports the converted `model`, runs it in ONNX Runtime and compares with the torch.nn
    `reference` in eager mode (float32, 1e-4)."""
    with torch.no_grad():
        expected = reference(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    proto = _export(model, inputs, dynamo, full_check, **export_kwargs)
    types = _op_types(proto)
    for op in expect_ops:
        assert op in types, f"{op} not in the exported graph: {sorted(types)}"
    got = _run(proto, *inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-4, rtol=1e-4)
    return proto, types


def _converted(model):
    converted = cnnops.convert(copy.deepcopy(model))
    assert not any(type(m).__module__.startswith("torch.nn.modules.conv") for m in converted.modules())
    return converted


def _randomize_bn(model):
    # running statistics other than (0, 1) so a wrong use of them shows
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def torchvision():
    return pytest.importorskip("torchvision")


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_resnet18(torchvision, dynamo):
    torch.manual_seed(0)
    reference = _randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    _, types = _check(reference, _converted(reference), (x,), dynamo)
    # BatchNormalization may be folded into Conv by the exporter's optimizer
    assert {"Conv", "MaxPool"} <= types and ({"GlobalAveragePool", "ReduceMean"} & types), sorted(types)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_mobilenet_v3_small(torchvision, dynamo):
    torch.manual_seed(0)
    reference = _randomize_bn(torchvision.models.mobilenet_v3_small(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    _check(reference, _converted(reference), (x,), dynamo, expect_ops=("Conv",))


class Small1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 5, padding=2, dilation=1)
        self.bn = nn.BatchNorm1d(8)
        self.pool = nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True)
        self.conv2 = nn.Conv1d(8, 8, 3, padding="same", dilation=2, groups=4, padding_mode="reflect")
        self.avg = nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.gap(self.avg(self.conv2(x))).flatten(1)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_small_1d(dynamo):
    torch.manual_seed(0)
    reference = _randomize_bn(Small1d()).eval()
    _check(reference, _converted(reference), (torch.randn(2, 3, 23),), dynamo,
           expect_ops=("Conv", "MaxPool", "AveragePool"))


class Small3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.pool = nn.AvgPool3d(2, stride=2, ceil_mode=False)
        self.conv2 = nn.Conv3d(4, 4, (1, 3, 3), bias=False)
        self.mp = nn.MaxPool3d(2, padding=1)
        self.ap = nn.AdaptiveAvgPool3d((1, 2, 2))

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.ap(self.mp(self.conv2(x)))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_small_3d(dynamo):
    torch.manual_seed(0)
    reference = _randomize_bn(Small3d()).eval()
    _check(reference, _converted(reference), (torch.randn(2, 2, 6, 12, 12),), dynamo,
           expect_ops=("Conv", "AveragePool"))


class UNet(nn.Module):
    """Encoder max pools with indices, decoder max unpools with them (SegNet style), skip adds."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2, return_indices=True)
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2, return_indices=True)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.unpool2 = nn.MaxUnpool2d(2)
        self.dec2 = nn.Conv2d(16, 8, 3, padding=1)
        self.unpool1 = nn.MaxUnpool2d(2)
        self.dec1 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        p1, i1 = self.pool1(e1)
        e2 = self.enc2(p1)
        p2, i2 = self.pool2(e2)
        m = torch.relu(self.mid(p2))
        d2 = self.dec2(self.unpool2(m, i2, output_size=e2.shape) + e2)
        return self.dec1(self.unpool1(d2, i1) + e1), i1


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_unet_max_unpool(dynamo):
    torch.manual_seed(0)
    reference = _randomize_bn(UNet()).eval()
    _check(reference, _converted(reference), (torch.randn(2, 3, 16, 20),), dynamo, expect_ops=("MaxPool",))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.inorm_plain = nn.InstanceNorm2d(8)
        self.ln = nn.LayerNorm([8, 6, 7])
        self.ln_last = nn.LayerNorm(7, elementwise_affine=False)

    def forward(self, x):
        x = self.conv(x)
        x = self.inorm_plain(self.inorm(self.gn(x)))
        return self.ln_last(self.ln(x))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_layer_group_instance_norm(dynamo):
    torch.manual_seed(0)
    reference = Norms().eval()
    with torch.no_grad():
        for m in reference.modules():
            for p in m.parameters(recurse=False):
                p.add_(torch.randn_like(p) * 0.2)
    _check(reference, _converted(reference), (torch.randn(2, 3, 6, 7),), dynamo)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_no_cnnops_domain_and_no_cnnops_needed(dynamo):
    """The deployed file holds only standard ONNX: loading and running it needs no cnnops."""
    torch.manual_seed(0)
    model = _converted(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))).eval()
    proto = _export(model, (torch.randn(1, 3, 8, 8),), dynamo)
    domains = {node.domain for node in proto.graph.node} | {opset.domain for opset in proto.opset_import}
    domains |= {node.domain for function in proto.functions for node in function.node}
    assert not any("cnnops" in d for d in domains), domains
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_batch(dynamo):
    """One file for every batch size: exported with batch 2, run with 1 and 3."""
    torch.manual_seed(0)
    reference = _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.GroupNorm(2, 8), nn.AvgPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())).eval()
    model = _converted(reference)
    x = torch.randn(2, 3, 9, 11)
    if dynamo:
        kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
    else:
        kwargs = {"input_names": ["x"], "output_names": ["y"], "dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}}
    proto = _export(model, (x,), dynamo, **kwargs)
    for n in (1, 3):
        xn = torch.randn(n, 3, 9, 11)
        with torch.no_grad():
            expected = reference(xn)
        torch.testing.assert_close(torch.from_numpy(_run(proto, xn)[0]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_image_size(dynamo):
    """Batch, height and width dynamic: every op but the shape-dependent ones (adaptive pools other
    than global, divisor_override), which raise in the TorchScript exporter."""
    torch.manual_seed(0)
    reference = _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.GroupNorm(4, 8), nn.AvgPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())).eval()
    model = _converted(reference)
    if dynamo:
        dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=8), 3: torch.export.Dim("w", min=8)}
        kwargs = {"dynamic_shapes": (dims,)}
    else:
        kwargs = {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch", 2: "h", 3: "w"}}}
    proto = _export(model, (torch.randn(2, 3, 17, 20),), dynamo, **kwargs)
    for shape in ((1, 3, 16, 16), (3, 3, 33, 21)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = reference(x)
        torch.testing.assert_close(torch.from_numpy(_run(proto, x)[0]), expected, atol=1e-4, rtol=1e-4)
    if not dynamo:
        # (the dynamo exporter, when torch.export fails on a dynamic dim, retries with strict=True
        # and the dims it had to specialize made static, for torch.nn's model alike)
        uneven = cnnops.convert(nn.Sequential(nn.AdaptiveAvgPool2d((2, 3)))).eval()
        with pytest.raises(NotImplementedError, match="static input sizes"):
            _export(uneven, (torch.randn(1, 2, 8, 9),), dynamo, **kwargs)


class _Call(nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.params = nn.ParameterList(params)

    def forward(self, x):
        return self.fn(x, *self.params)


_cops = torch.ops.cnnops

# (raw cnnops op call, the same computed by torch, input shape): the symbolic functions of the
# TorchScript exporter, reached by a user calling torch.ops.cnnops directly.
_g = torch.Generator().manual_seed(0)
_w = torch.randn(6, 2, 3, 3, generator=_g)
_b = torch.randn(6, generator=_g)
_rm, _rv = torch.randn(4, generator=_g) * 0.1, torch.rand(4, generator=_g) + 0.5
_gamma, _beta = torch.randn(4, generator=_g), torch.randn(4, generator=_g)
RAW_OPS = {
    "conv_relu_grouped": (lambda x: _cops.conv_forward(x, _w, _b, [2, 1], [1, 0], [1, 2], 2, "relu"),
                          lambda x: torch.relu(torch.nn.functional.conv2d(x, _w, _b, (2, 1), (1, 0), (1, 2), 2)),
                          (2, 4, 9, 10)),
    "conv_depthwise_no_bias": (lambda x: _cops.conv_forward(x, _w[:4, :1], None, [1, 1], [1, 1], [1, 1], 4),
                               lambda x: torch.nn.functional.conv2d(x, _w[:4, :1], None, 1, 1, 1, 4), (2, 4, 7, 7)),
    "max_pool_indices_ceil": (lambda x: _cops.max_pool_forward(x, [3, 2], [2, 2], [1, 1], [1, 1], True),
                              lambda x: torch.nn.functional.max_pool2d(x, (3, 2), 2, 1, 1, True, True),
                              (2, 3, 9, 8)),
    "max_pool_dilated_1d": (lambda x: _cops.max_pool_forward(x, [3], [2], [1], [2], False),
                            lambda x: torch.nn.functional.max_pool1d(x, 3, 2, 1, 2, False, True), (2, 3, 11)),
    "avg_pool_ceil_no_pad_count": (lambda x: _cops.avg_pool_forward(x, [3, 3, 3], [2, 2, 2], [1, 1, 1], True, False, 0),
                                   lambda x: torch.nn.functional.avg_pool3d(x, 3, 2, 1, True, False), (1, 2, 6, 7, 8)),
    "avg_pool_divisor_override": (lambda x: _cops.avg_pool_forward(x, [3, 2], [2, 1], [1, 1], True, True, 4),
                                  lambda x: torch.nn.functional.avg_pool2d(x, (3, 2), (2, 1), 1, True, True, 4),
                                  (2, 3, 9, 8)),
    "adaptive_avg_uneven": (lambda x: _cops.adaptive_avg_pool_forward(x, [3, 4]),
                            lambda x: torch.nn.functional.adaptive_avg_pool2d(x, (3, 4)), (2, 3, 7, 10)),
    "adaptive_max_even": (lambda x: _cops.adaptive_max_pool_forward(x, [2, 5]),
                          lambda x: torch.nn.functional.adaptive_max_pool2d(x, (2, 5), True), (2, 3, 8, 10)),
    "max_unpool_3d": (lambda x: _cops.max_unpool_forward(*_cops.max_pool_forward(x, [2, 2, 2], [2, 2, 2], [0, 0, 0],
                                                                                [1, 1, 1], False), [5, 6, 7]),
                      lambda x: torch.nn.functional.max_unpool3d(
                          *torch.nn.functional.max_pool3d(x, 2, 2, return_indices=True), 2, output_size=[5, 6, 7]),
                      (2, 2, 5, 6, 7)),
    "batch_norm_eval": (lambda x: _cops.batch_norm_forward(x, _gamma, None, _rm, _rv, False, 0.1, 1e-3),
                        lambda x: (torch.nn.functional.batch_norm(x, _rm, _rv, _gamma, None, False, 0.1, 1e-3), _rm,
                                   torch.rsqrt(_rv + 1e-3)),
                        (2, 4, 3, 5)),
    "layer_norm": (lambda x: _cops.layer_norm_forward(x, [3, 5], None, None, 1e-5),
                   lambda x: (torch.nn.functional.layer_norm(x, [3, 5]), x.mean((2, 3)),
                              torch.rsqrt(x.var((2, 3), correction=0) + 1e-5)),
                   (2, 4, 3, 5)),
    "group_norm": (lambda x: _cops.group_norm_forward(x, _gamma, _beta, 2, 1e-5),
                   lambda x: (torch.nn.functional.group_norm(x, 2, _gamma, _beta), x.reshape(2, 2, -1).mean(2),
                              torch.rsqrt(x.reshape(2, 2, -1).var(2, correction=0) + 1e-5)),
                   (2, 4, 3, 5)),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("case", list(RAW_OPS))
def test_raw_ops(case, dynamo):
    """torch.ops.cnnops called directly: the TorchScript exporter's symbolics, or the dynamo
    exporter with cnnops.onnx.translation_table()."""
    op_call, torch_call, shape = RAW_OPS[case]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected = torch_call(x)
    got = op_call(x)
    for g, e in zip(_as_tuple(got), _as_tuple(expected)):
        torch.testing.assert_close(g, e)  # the torch expression is the op's meaning
    kwargs = {"custom_translation_table": cnnops.onnx.translation_table()} if dynamo else {}
    if dynamo and case == "batch_norm_eval":
        # its schema mutates the running statistics: the exporter gets an auto_functionalized_v2
        # node that no table entry can match (documented; cnnops.functional.batch_norm exports)
        with pytest.raises(torch.onnx.errors.OnnxExporterError):
            _export(_Call(lambda x: op_call(x)), (x,), dynamo, **kwargs)
        return
    _check(_Call(lambda x: torch_call(x)), _Call(lambda x: op_call(x)), (x,), dynamo, **kwargs)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_what_onnx_cannot_express_raises(dynamo):
    """Never a wrong graph: a max over windows of different sizes has no ONNX operator."""
    model = cnnops.convert(nn.Sequential(nn.AdaptiveMaxPool2d((3, 3)))).eval()
    match = "adaptive max pool to output_size=.3, 3. from spatial size .8, 8."
    # the dynamo exporter wraps the error from torch.export in its own, with the message
    with pytest.raises(torch.onnx.errors.OnnxExporterError if dynamo else NotImplementedError, match=match):
        _export(model, (torch.randn(1, 2, 8, 8),), dynamo)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("module, shape", [
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True, divisor_override=3), (2, 3, 8, 9)),
    (nn.AvgPool2d(2, divisor_override=7), (1, 2, 6, 6)),
    # depth 5, kernel 2, stride 2, padding 1: ceil_mode's last window would start in the right
    # padding, and torch drops it (exported without ceil_mode: explicit pads)
    (nn.AvgPool3d((2, 3, 3), (2, 2, 1), (1, 1, 0), ceil_mode=True, count_include_pad=False, divisor_override=5),
     (1, 2, 5, 6, 7)),
])
def test_avg_pool_divisor_override(module, shape, dynamo):
    """torch's exporters drop divisor_override (a wrong graph for torch.nn); cnnops exports the sum
    over each window divided by it."""
    model = cnnops.convert(nn.Sequential(copy.deepcopy(module))).eval()
    _check(module, model, (torch.randn(shape),), dynamo, expect_ops=("AveragePool", "Mul"))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_ceil_mode_window_dropped_as_torch(dynamo):
    """torch drops a ceil_mode window that would start in the right padding (size 5, kernel 2,
    stride 2, padding 1: 3 windows, not 4); so do the ONNX spec and ONNX Runtime (not onnx 1.23's
    shape inference, hence no full_check)."""
    reference = nn.Sequential(nn.MaxPool2d(2, 2, 1, ceil_mode=True), nn.AvgPool2d(2, 2, 1, ceil_mode=True))
    _check(reference, _converted(reference), (torch.randn(1, 2, 5, 9),), dynamo, full_check=False)


def _twin_cases():
    g = torch.Generator().manual_seed(2)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x4, x5 = r(2, 4, 7, 9), r(2, 2, 5, 6, 7)
    w, b = r(6, 2, 3, 3), r(6)
    out, idx = torch.ops.cnnops.max_pool_forward(x4, [2, 2], [2, 2], [0, 0], [1, 1], False)
    return [
        ("conv_forward", (x4, w, b, [2, 1], [1, 2], [1, 2], 2, "relu")),
        ("conv_forward", (r(2, 3, 9), r(4, 3, 2), None, [1], [0], [3], 1)),
        ("max_pool_forward", (x4, [3, 2], [2, 1], [1, 1], [2, 1], True)),
        ("avg_pool_forward", (x5, [3, 2, 3], [2, 2, 1], [1, 0, 1], True, False, 0)),
        ("avg_pool_forward", (x4, [3, 2], [2, 2], [1, 1], True, False, 5)),
        ("avg_pool_forward", (x5, [2, 3, 3], [1, 2, 2], [1, 0, 1], False, True, -3)),
        ("adaptive_avg_pool_forward", (x4, [3, 4])),
        ("adaptive_avg_pool_forward", (x5, [1, 1, 1])),
        ("adaptive_avg_pool_forward", (x5, [5, 2, 7])),
        ("adaptive_max_pool_forward", (x4, [7, 3])),
        ("max_unpool_forward", (out, idx, [7, 9])),
        ("batch_norm_forward", (x4, r(4), r(4), r(4), r(4).abs() + 0.5, False, 0.1, 1e-5)),
        ("batch_norm_forward", (x4, r(4), None, r(4), r(4).abs() + 0.5, True, 0.3, 1e-5)),
        ("batch_norm_forward", (x5, None, r(2), None, None, True, 0.1, 1e-3)),
        ("layer_norm_forward", (x4, [7, 9], r(7, 9), r(7, 9), 1e-5)),
        ("layer_norm_forward", (x4, [9], None, None, 1e-3)),
        ("group_norm_forward", (x4, r(4), r(4), 2, 1e-5)),
        ("group_norm_forward", (x5, None, None, 2, 1e-5)),
    ]


@pytest.mark.parametrize("case", range(len(_twin_cases())))
def test_twins_compute_what_the_ops_compute(case):
    """While exporting, cnnops.functional calls these torch expressions instead of the ops: every
    output (and a running-statistics update) must be the op's."""
    name, args = _twin_cases()[case]
    op_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    twin_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    expected = cnnops.onnx.twin(name)(*twin_args)
    got = getattr(torch.ops.cnnops, name)(*op_args)
    for g, e in zip(_as_tuple(got), _as_tuple(expected)):
        torch.testing.assert_close(g, e)
    for o, t in zip(op_args, twin_args):  # running statistics updated alike
        if isinstance(o, torch.Tensor):
            torch.testing.assert_close(o, t)


def test_routing_only_while_exporting():
    """Outside torch.onnx.export, cnnops.functional runs the cnnops ops (the twins only export)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.name())
            return func(*args, **(kwargs or {}))

    model = cnnops.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.MaxPool2d(2))).eval()
    _export(model, (torch.randn(1, 2, 6, 6),), True)
    assert not cnnops.onnx.exporting()
    with Record() as record:
        model(torch.randn(1, 2, 6, 6))
    assert {"cnnops::conv_forward", "cnnops::batch_norm_forward", "cnnops::max_pool_forward"} <= record.ops
    assert not any(name.startswith("aten::conv") or "batch_norm" in name and name.startswith("aten")
                   for name in record.ops)


def test_compile_fullgraph_keeps_the_cnnops_ops():
    """torch.compile traces the routing check without a graph break and records the cnnops ops."""
    targets = set()

    def backend(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.MaxPool2d(2), nn.AvgPool2d(2)).eval()
    model = _converted(reference)
    x = torch.randn(2, 2, 10, 10)
    torch.testing.assert_close(torch.compile(model, backend=backend, fullgraph=True)(x), reference(x))
    assert {"cnnops.conv_forward", "cnnops.group_norm_forward", "cnnops.max_pool_forward",
            "cnnops.avg_pool_forward"} <= {t.replace("torch.ops.", "").replace(".default", "")
                                           for t in targets}, targets


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_training_mode_batch_statistics(dynamo):
    """A model exported in training mode normalizes with the batch statistics, as torch.nn's does."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.InstanceNorm2d(4, track_running_stats=True),
                              nn.ReLU()).train()
    model = _converted(reference)
    kwargs = {} if dynamo else {"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False}
    _check(copy.deepcopy(reference), model, (torch.randn(2, 3, 8, 8),), dynamo, **kwargs)


@pytest.mark.parametrize("dynamo, opset", [(False, 11), (False, 13), (False, 17), (True, 18), (True, 23)])
def test_opset_versions(dynamo, opset):
    """The symbolics need opset 11 (ScatterElements); below 13 Squeeze and below 18 ReduceMean take
    attributes. The dynamo exporter starts at 18."""
    torch.manual_seed(0)
    reference = _randomize_bn(UNet()).eval()
    proto, _ = _check(reference, _converted(reference), (torch.randn(1, 3, 8, 12),), dynamo, opset_version=opset)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    if not dynamo:
        for case in ("batch_norm_eval", "layer_norm", "group_norm", "max_unpool_3d"):
            op_call, torch_call, shape = RAW_OPS[case]
            x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
            _check(_Call(torch_call), _Call(op_call), (x,), dynamo, opset_version=opset)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_fused_conv_bn_relu(dynamo):
    """cnnops.fuse_conv_bn's ConvReLU modules (conv_forward's activation="relu") export as Conv + Relu."""
    torch.manual_seed(0)
    reference = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                            nn.Conv2d(8, 4, 1),
                                            nn.BatchNorm2d(4))).eval()
    fused = cnnops.fuse_conv_bn(_converted(reference))
    assert any(isinstance(m, cnnops.nn.ConvReLU2d) for m in fused.modules())
    _check(reference, fused, (torch.randn(2, 3, 7, 9),), dynamo, expect_ops=("Conv", "Relu"))


def test_exported_program_with_translation_table():
    """An ExportedProgram made before torch.onnx.export holds the cnnops ops themselves; the table
    translates them."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                              nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d((2, 3))).eval()
    x = torch.randn(2, 3, 9, 13)
    program = torch.export.export(_converted(reference), (x,))
    assert any("cnnops" in str(node.target) for node in program.graph.nodes)
    _check(reference, program, (x,), True, custom_translation_table=cnnops.onnx.translation_table())
