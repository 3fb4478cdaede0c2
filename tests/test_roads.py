"""Where a converted model can go (issue 11): FX, torchvision's feature extraction, TorchScript
(trace and script, loaded in a fresh process), FlopCounterMode, torch.ao fusion and
quantization, cnnops.revert and convert's report. Each road runs the torch.nn model and its
converted deep copy; the expected values are the torch.nn model's on the same road.

ONNX export lives in tests/test_onnx.py.
"""
import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torchvision
from torch import nn

import cnnops
import cnnops.functional as CF
import cnnops.nn as cnn
from cnnops.conversion import SUPPORTED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 1e-5, 1e-5

# ---------------------------------------------------------------------------------------------
# Model families: (torch.nn model, example input); small sizes, num_classes=10
# ---------------------------------------------------------------------------------------------


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")
        self.gn = nn.GroupNorm(2, 8)
        self.avg = nn.AvgPool1d(2, ceil_mode=True)
        self.inorm = nn.InstanceNorm1d(8, affine=True)
        self.ln = nn.LayerNorm(8)
        self.head = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.inorm(self.avg(self.gn(self.conv2(x))))
        x = self.ln(x.transpose(1, 2)).transpose(1, 2)
        return self.fc(self.head(x).flatten(1))


class Net3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool3d(2)
        self.conv2 = nn.Conv3d(4, 8, 3, stride=2, padding=1)
        self.inorm = nn.InstanceNorm3d(8)
        self.avg = nn.AvgPool3d(2, stride=1)
        self.head = nn.AdaptiveMaxPool3d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.avg(self.inorm(self.conv2(x)))
        return self.fc(self.head(x).flatten(1))


class UNet(nn.Module):
    """A small U-Net (SegNet-style decoder): max pool indices feed MaxUnpool2d."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2, return_indices=True)
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2, return_indices=True)
        self.mid = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.unpool2 = nn.MaxUnpool2d(2)
        self.dec2 = nn.Sequential(nn.Conv2d(32, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.unpool1 = nn.MaxUnpool2d(2)
        self.dec1 = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        p1, i1 = self.pool1(e1)
        e2 = self.enc2(p1)
        p2, i2 = self.pool2(e2)
        m = self.mid(p2)
        d2 = self.dec2(torch.cat([self.unpool2(m, i2), e2], 1))
        return self.dec1(torch.cat([self.unpool1(d2, i1), e1], 1))


def make(family, seed=0):
    """(torch.nn model in eval mode with non-trivial running statistics, example input)."""
    torch.manual_seed(seed)
    if family == "resnet":
        model, x = torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64)
    elif family == "mobilenet":
        model, x = torchvision.models.mobilenet_v3_small(num_classes=10), torch.randn(1, 3, 64, 64)
    elif family == "net1d":
        model, x = Net1d(), torch.randn(2, 3, 32)
    elif family == "net3d":
        model, x = Net3d(), torch.randn(2, 2, 8, 8, 8)
    elif family == "unet":
        model, x = UNet(), torch.randn(1, 3, 32, 32)
    else:
        raise ValueError(family)
    with torch.no_grad():  # running statistics that are not the initial 0 / 1
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), x


def pair(family):
    ref, x = make(family)
    return ref, cnnops.convert(copy.deepcopy(ref)), x


FAMILIES = ["resnet", "mobilenet", "net1d", "net3d", "unet"]


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def cnnops_module_count(model):
    return sum(type(m).__module__ == "cnnops.nn" for m in model.modules())


# ---------------------------------------------------------------------------------------------
# FX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fx_symbolic_trace(family):
    ref, model, x = pair(family)
    traced_ref = torch.fx.symbolic_trace(ref)
    traced = torch.fx.symbolic_trace(model)
    # the torch.nn model's graph, each cnnops module a call_module node as its twin is
    assert traced.code == traced_ref.code
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert any(type(traced.get_submodule(t)).__module__ == "cnnops.nn" for t in targets)
    with torch.no_grad():
        assert_close(traced(x), traced_ref(x))
        assert_close(traced(x), ref(x))


@pytest.mark.parametrize("family", ["resnet", "mobilenet", "unet"])
def test_create_feature_extractor(family):
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    ref, model, x = pair(family)
    assert get_graph_node_names(model) == get_graph_node_names(ref)
    nodes = {"resnet": ["layer1", "layer3.1.bn2", "avgpool"], "mobilenet": ["features.3", "features.12", "avgpool"],
             "unet": ["pool1", "unpool2", "dec2.1"]}[family]
    extractor_ref = create_feature_extractor(ref, nodes)
    extractor = create_feature_extractor(model, nodes)
    assert cnnops_module_count(extractor) > 0
    with torch.no_grad():
        features_ref, features = extractor_ref(x), extractor(x)
    assert list(features) == list(features_ref) == nodes
    for name in nodes:
        assert_close(features[name], features_ref[name])


def test_fx_functional_calls_are_leaf_nodes():
    def f(x, w, b):
        y = CF.conv2d(x, w, b, 1, 1)
        y, i = CF.max_pool2d(y, 2, return_indices=True)
        y = CF.max_unpool2d(y, i, 2)
        y = CF.batch_norm(y, None, None, training=True)
        y = CF.group_norm(y, 2)
        y = CF.instance_norm(y)
        y = CF.layer_norm(y, [8])
        y = CF.avg_pool2d(y, 2)
        return CF.adaptive_max_pool2d(y, 1) + CF.adaptive_avg_pool2d(y, 1)

    traced = torch.fx.symbolic_trace(f)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    expected = [CF.conv2d, CF.max_pool2d, CF.max_unpool2d, CF.batch_norm, CF.group_norm, CF.instance_norm,
                CF.layer_norm, CF.avg_pool2d, CF.adaptive_max_pool2d, CF.adaptive_avg_pool2d]
    assert [t for t in targets if t in expected] == expected
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    assert_close(traced(x, w, b), f(x, w, b))


def test_fx_tracer_that_traces_through_torch_modules():
    """A tracer that does not take torch.nn modules for leaves traces through the cnnops forward:
    the convolutions become cnnops.functional nodes (ConvReLU keeps its fused ReLU)."""

    class Through(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return False

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1))
    ref = copy.deepcopy(model)
    cnnops.convert(model)
    model[2].__class__ = cnn.ConvReLU2d
    graph = Through().trace(model)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [CF.conv2d, CF.max_pool2d, CF._conv]
    traced = torch.fx.GraphModule(model, graph)
    x = torch.randn(2, 3, 9, 9)
    assert_close(traced(x), torch.relu(ref(x)))


def test_prepare_fx_raises_and_works_after_revert():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    ref, model, x = pair("net1d")
    qconfig_mapping = get_default_qconfig_mapping("x86")
    with pytest.raises(NotImplementedError, match=r"no quantized kernels.*cnnops\.revert\(model\)"):
        prepare_fx(model, qconfig_mapping, (x,))
    cnnops.revert(model)
    quantized = []
    for m in (ref, model):
        prepared = prepare_fx(m, qconfig_mapping, (x,))
        with torch.no_grad():
            prepared(x)
        quantized.append(convert_fx(prepared)(x))
    torch.testing.assert_close(quantized[1], quantized[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# TorchScript: trace and script here, load and run in a fresh process
# ---------------------------------------------------------------------------------------------

_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    import cnnops  # noqa: F401  (registers torch.ops.cnnops for the loaded programs)
    out = {}
    for name, path, x_path in json.loads(sys.argv[1]):
        program = torch.jit.load(path)
        with torch.no_grad():
            y = program(torch.load(x_path))
        torch.save(y, path + ".out")
        out[name] = str(program.inlined_graph).count("cnnops::")
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def torchscript_runs(tmp_path_factory):
    """Every family traced and scripted (torch.nn and cnnops), saved, then loaded and run in one
    fresh process. {(family, road, "ref" | "cnnops"): (output, cnnops op calls in its graph)}, or
    an exception in place of the output where the road fails in this process."""
    tmp = tmp_path_factory.mktemp("jit")
    jobs, results = [], {}
    for family in FAMILIES:
        ref, model, x = pair(family)
        x_path = str(tmp / f"{family}_x.pt")
        torch.save(x, x_path)
        for road in ("trace", "script"):
            for kind, m in (("ref", ref), ("cnnops", model)):
                path = str(tmp / f"{family}_{road}_{kind}.pt")
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        program = torch.jit.trace(m, x) if road == "trace" else torch.jit.script(m)
                    program.save(path)
                except (RuntimeError, TypeError) as error:  # torch.nn.MaxUnpool2d does not script or trace
                    results[(family, road, kind)] = (error, 0)
                    continue
                jobs.append(((family, road, kind), path, x_path))
    spec = json.dumps([["|".join(key), path, x_path] for key, path, x_path in jobs])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _LOADER, spec], capture_output=True, text=True, env=env,
                          cwd=str(tmp), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    for key, path, _ in jobs:
        results[key] = (torch.load(path + ".out"), counts["|".join(key)])
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_jit_trace_save_load(torchscript_runs, family):
    actual, ops = torchscript_runs[(family, "trace", "cnnops")]
    assert ops > 0  # the loaded program runs the cnnops ops
    expected, ref_ops = torchscript_runs[(family, "trace", "ref")]
    if isinstance(expected, Exception):
        # torch.jit.trace fails on torch.nn.MaxUnpool2d in torch 2.14 (torch._check_value on a
        # traced size); the cnnops model traces, and is compared with the torch.nn model in eager
        assert family == "unet"
        ref, x = make(family)
        with torch.no_grad():
            expected = ref(x)
    else:
        assert ref_ops == 0
    assert_close(actual, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_jit_script_save_load(torchscript_runs, family):
    actual, ops = torchscript_runs[(family, "script", "cnnops")]
    assert ops > 0
    expected, _ = torchscript_runs[(family, "script", "ref")]
    if isinstance(expected, Exception):
        # torch.jit.script fails on torch.nn.MaxUnpool2d (its int-or-tuple attributes); the
        # cnnops model scripts, and is compared with the torch.nn model in eager mode
        assert family == "unet"
        ref, x = make(family)
        with torch.no_grad():
            expected = ref(x)
    assert_close(actual, expected)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_jit_script_modules_match_torch(train):
    """Module options the model families do not reach, scripted in both forms, in this process;
    training mode updates the same running statistics."""
    modules = [
        nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, groups=1, bias=False),
        nn.Conv2d(3, 6, 3, padding="same", dilation=2, groups=3),
        nn.Conv2d(3, 4, (3, 2), padding="valid"),
        nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"),
        nn.MaxPool2d(3, 2, 1, dilation=1, ceil_mode=True),
        nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=5),
        nn.AdaptiveAvgPool2d((3, 2)),
        nn.AdaptiveMaxPool2d(3, return_indices=True),
        nn.BatchNorm2d(3, momentum=None),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        nn.GroupNorm(3, 3),
        nn.LayerNorm([9, 9]),
    ]
    x = torch.randn(2, 3, 9, 9)
    for module in modules:
        ref = module.train(train)
        model = cnnops.convert(copy.deepcopy(ref))
        scripted_ref, scripted = torch.jit.script(ref), torch.jit.script(model)
        assert "cnnops::" in str(scripted.inlined_graph), module
        for _ in range(2):
            assert_close(scripted(x), scripted_ref(x))
        assert_close(list(scripted.state_dict().values()), list(scripted_ref.state_dict().values()))
        # unbatched input, as torch.nn takes it
        if not isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            assert_close(scripted(x[0]), scripted_ref(x[0]))


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_flop_counter(family):
    from torch.utils.flop_counter import FlopCounterMode

    ref, model, x = pair(family)
    totals = []
    for m in (ref, model):
        m.train()
        with FlopCounterMode(display=False) as counter:
            m(x.requires_grad_()).sum().backward()
        totals.append(counter.get_total_flops())
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        if m is ref:
            torch_conv = counts["aten.convolution"], counts["aten.convolution_backward"]
        else:
            assert (counts["cnnops.conv_forward"], counts["cnnops.conv_backward"]) == torch_conv
    assert totals[1] == totals[0] > 0
    # cnnops.complexity: 2 FLOPs per convolution multiply-accumulate
    rows = cnnops.complexity(model, x).rows
    conv_macs = sum(r.macs for r in rows if r.type.startswith("Conv"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    assert counter.get_flop_counts()["Global"][torch.ops.cnnops.conv_forward] == 2 * conv_macs


def test_flop_counter_fused_conv_relu():
    from torch.utils.flop_counter import FlopCounterMode

    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        conv(x)
    fused = copy.deepcopy(conv)
    fused.__class__ = cnn.ConvReLU2d
    with FlopCounterMode(display=False) as fused_counter:
        fused(x)
    assert fused_counter.get_total_flops() == counter.get_total_flops() > 0


# ---------------------------------------------------------------------------------------------
# torch.ao: eager fusion and quantization
# ---------------------------------------------------------------------------------------------


class ConvBlocks(nn.Module):
    def __init__(self, dims):
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d),
                    3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.conv1, self.bn1, self.relu1 = conv(3, 4, 3, padding=1), bn(4), nn.ReLU()
        self.conv2, self.bn2 = conv(4, 4, 3, padding=1, bias=False), bn(4)
        self.conv3, self.relu3 = conv(4, 4, 1), nn.ReLU()
        self.fc, self.bn4 = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu3(self.conv3(self.bn2(self.conv2(x))))
        return self.bn4(self.fc(x.flatten(2).mean(2)))


FUSE = [["conv1", "bn1", "relu1"], ["conv2", "bn2"], ["conv3", "relu3"], ["fc", "bn4"]]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("qat", [False, True], ids=["eval", "qat"])
def test_fuse_modules(dims, qat):
    from torch.ao.quantization import fuse_modules, fuse_modules_qat

    torch.manual_seed(dims)
    ref = ConvBlocks(dims)
    x = torch.randn(4, 3, *[6] * dims)
    ref(x)  # running statistics away from 0 / 1
    ref.train(qat)
    model = cnnops.convert(copy.deepcopy(ref))
    fuse = fuse_modules_qat if qat else fuse_modules
    fused_ref, fused = fuse(ref, FUSE), fuse(model, FUSE)
    # the same modules as torch's fusion of the torch.nn model, converted
    expected_types = [type(m) for m in cnnops.convert(copy.deepcopy(fused_ref)).modules()]
    assert [type(m) for m in fused.modules()] == expected_types
    assert cnnops_module_count(fused) > 0
    assert list(fused.state_dict()) == list(fused_ref.state_dict())
    assert_close(fused(x), fused_ref(x))
    assert_close(list(fused.state_dict().values()), list(fused_ref.state_dict().values()))
    if qat:  # torch's QAT containers (nni.ConvBnReLU2d, ...) hold cnnops modules
        assert type(fused.conv1).__module__.startswith("torch.ao.nn.intrinsic")
        assert type(fused.conv1[0]) is SUPPORTED[type(ref.conv1)]


class Quantizable(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.dequant(self.pool(self.relu(self.bn(self.conv(self.quant(x))))))


@pytest.mark.parametrize("road", ["prepare", "prepare_qat", "quantize"])
def test_eager_quantization_raises_then_works_after_revert(road):
    Q = torch.ao.quantization
    torch.manual_seed(0)
    ref = Quantizable().train(road == "prepare_qat")
    model = cnnops.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 8, 8)
    for m in (ref, model):
        m.qconfig = Q.get_default_qat_qconfig("x86") if road == "prepare_qat" else Q.get_default_qconfig("x86")

    def run(m):
        if road == "quantize":
            return Q.quantize(m, lambda q, data: q(data), [x])(x)
        prepared = (Q.prepare_qat if road == "prepare_qat" else Q.prepare)(m)
        prepared(x)
        return Q.convert(prepared.eval())(x)

    with pytest.raises(NotImplementedError, match=r"cnnops has no quantized kernels.*cnnops\.revert\(model\)"):
        run(model)
    assert all(not hasattr(m, "activation_post_process") for m in model.modules())  # prepare copied the model
    cnnops.revert(model)
    torch.testing.assert_close(run(model), run(ref), rtol=0, atol=0)


def test_quantized_tensor_into_cnnops_names_revert():
    q = torch.quantize_per_tensor(torch.randn(1, 2, 4, 4), 0.1, 0, torch.quint8)
    with pytest.raises(NotImplementedError, match=r"quantized kernels.*cnnops\.revert"):
        cnn.MaxPool2d(2)(q)
    with pytest.raises(NotImplementedError, match=r"quantized kernels.*cnnops\.revert"):
        CF.group_norm(q, 1)


def test_dynamic_quantization_is_torch_s():
    """quantize_dynamic quantizes Linear only, in both models: the same result."""
    ref, model, x = pair("net1d")
    results = [torch.ao.quantization.quantize_dynamic(m, {nn.Linear})(x) for m in (ref, model)]
    assert_close(results[1], results[0])


# ---------------------------------------------------------------------------------------------
# cnnops.revert and convert's report
# ---------------------------------------------------------------------------------------------


def every_supported_module():
    return nn.ModuleList([
        nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv3d(2, 2, 1),
        nn.MaxPool1d(2), nn.MaxPool2d(2), nn.MaxPool3d(2), nn.AvgPool1d(2), nn.AvgPool2d(2), nn.AvgPool3d(2),
        nn.AdaptiveAvgPool1d(1), nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool3d(1),
        nn.AdaptiveMaxPool1d(1), nn.AdaptiveMaxPool2d(1), nn.AdaptiveMaxPool3d(1),
        nn.MaxUnpool1d(2), nn.MaxUnpool2d(2), nn.MaxUnpool3d(2),
        nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2),
        nn.InstanceNorm1d(2), nn.InstanceNorm2d(2), nn.InstanceNorm3d(2),
        nn.LayerNorm(2), nn.GroupNorm(1, 2), nn.SyncBatchNorm(2), nn.ReLU(),
    ])


def test_revert_is_the_inverse_of_convert():
    model = every_supported_module()
    assert {type(m) for m in model} >= set(SUPPORTED)
    before = [(m, type(m), dict(m.named_parameters()), dict(m.named_buffers())) for m in model.modules()]
    hook_calls = []
    model[1].register_forward_hook(lambda *args: hook_calls.append(1))
    state = copy.deepcopy(model.state_dict())
    _, convert_report = cnnops.convert(model, report=True)
    assert all(type(m) in SUPPORTED.values() for m in model[:-1])
    _, report = cnnops.revert(model, report=True)
    assert len(report.replaced) == len(convert_report.replaced) == len(SUPPORTED)
    after = list(model.modules())
    assert len(after) == len(before)
    for module, (old, old_type, params, buffers) in zip(after, before):
        assert module is old and type(module) is old_type
        assert all(p is params[n] for n, p in module.named_parameters())
        assert all(b is buffers[n] for n, b in module.named_buffers())
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
    model[1](torch.randn(1, 2, 3, 3))
    assert hook_calls == [1]
    assert "cnnops.revert: 27 replaced" in str(report)


@pytest.mark.parametrize("family", FAMILIES)
def test_revert_gives_the_torch_model_back(family):
    ref, model, x = pair(family)
    cnnops.revert(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_revert_leaves_fused_conv_relu_and_reports_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fused = cnnops.fuse_conv_bn(cnnops.convert(model))
    _, report = cnnops.revert(fused, report=True)
    left = [(name, kind) for name, kind, _ in report.left]
    assert any(kind.startswith("ConvReLU") for _, kind in left), report
    with pytest.raises(TypeError, match="TorchScript"):
        cnnops.revert(torch.jit.script(nn.ReLU()))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cnnops.revert("model")


def test_convert_reports_parametrized_weight_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.ReLU(),
                          nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 4, 1)))
    x = torch.randn(1, 3, 8, 8)
    expected = model(x)
    _, report = cnnops.convert(model, report=True)
    reasons = {name: reason for name, _, reason in report.left}
    assert "parametrized" in reasons["0"] and "weight" in reasons["0"]
    assert "parametrized" in reasons["2"]
    assert report.replaced == []
    assert "ParametrizedConv2d" in str(report)
    assert_close(model(x), expected)


def test_convert_old_weight_norm_hook():
    """torch.nn.utils.weight_norm (a forward pre-hook that sets .weight) keeps the module's type:
    it is converted, and computes with the hook's weight (outputs and gradients as torch)."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model = copy.deepcopy(ref)  # before weight_norm: torch cannot deepcopy a module that has it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for m in (ref, model):
            nn.utils.weight_norm(m[0])
    _, report = cnnops.convert(model, report=True)
    assert [name for name, *_ in report.replaced] == ["0"]
    x = torch.randn(2, 3, 8, 8)
    y_ref, y = ref(x), model(x)
    assert_close(y, y_ref)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [ref[0].weight_g, ref[0].weight_v])
    g = torch.autograd.grad(y.square().sum(), [model[0].weight_g, model[0].weight_v])
    assert_close(g, g_ref)


def test_convert_reports_subclass_with_children():
    class Custom(nn.Conv2d):
        def __init__(self):
            super().__init__(3, 4, 3)
            self.extra = nn.ReLU()

        def forward(self, x):
            return self.extra(super().forward(x))

    _, report = cnnops.convert(nn.Sequential(Custom()), report=True)
    reasons = {name: reason for name, _, reason in report.left}
    assert "subclass of torch.nn.Conv2d" in reasons["0"]


# ---------------------------------------------------------------------------------------------
# Roads that already worked: kept so
# ---------------------------------------------------------------------------------------------


def test_export_save_load_hooks_checkpoint_profiler(tmp_path):
    ref, model, x = pair("net1d")
    # torch.export, saved and loaded (import cnnops first: the program calls torch.ops.cnnops)
    exported = torch.export.export(model, (x,))
    torch.export.save(exported, tmp_path / "net.pt2")
    loaded = torch.export.load(tmp_path / "net.pt2")
    assert any("cnnops" in str(n.target) for n in loaded.graph.nodes)
    with torch.no_grad():
        assert_close(loaded.module()(x), ref(x))
    # forward hooks fire on cnnops modules as on torch.nn ones
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(x)
    assert seen == [torch.Size([2, 8, 32])]
    # activation checkpointing: the same gradients
    model.train()
    ref.train()
    grads = []
    for m in (ref, model):
        xg = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(m, xg, use_reentrant=False)
        grads.append(torch.autograd.grad(out.sum(), [xg, *m.parameters()]))
    assert_close(grads[1], grads[0])
    # the profiler sees the cnnops ops
    with torch.profiler.profile() as prof:
        model(x)
    assert any(e.key.startswith("cnnops::conv_forward") for e in prof.key_averages())


@pytest.mark.parametrize("dims", [2, 3])
def test_fuse_modules_bn_relu(dims):
    from torch.ao.quantization import fuse_modules_qat

    bn = nn.BatchNorm2d(4) if dims == 2 else nn.BatchNorm3d(4)
    ref = nn.Sequential(bn, nn.ReLU()).train()
    model = cnnops.convert(copy.deepcopy(ref))
    fused_ref, fused = fuse_modules_qat(ref, [["0", "1"]]), fuse_modules_qat(model, [["0", "1"]])
    assert type(fused[0]) is type(fused_ref[0]) and type(fused[0][0]) is SUPPORTED[type(bn)]
    x = torch.randn(2, 4, *[5] * dims)
    assert_close(fused(x), fused_ref(x))
    assert_close(fused[0][0].running_mean, fused_ref[0][0].running_mean)


def test_fused_conv_relu_scripts_traces_and_fx_traces():
    """cnnops.fuse_conv_bn's ConvReLU modules (relu inside the conv op) on every road."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)).eval()
    with torch.no_grad():
        ref[1].running_var.uniform_(0.5, 2)
    fused = cnnops.fuse_conv_bn(cnnops.convert(copy.deepcopy(ref)))
    assert any(type(m).__name__ == "ConvReLU2d" for m in fused.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = ref(x)
        scripted = torch.jit.script(fused)
        assert "cnnops::conv_forward" in str(scripted.inlined_graph)
        assert_close(scripted(x), expected)
        assert_close(torch.jit.trace(fused, x)(x), expected)
        assert_close(torch.fx.symbolic_trace(fused)(x), expected)


def test_prepare_fx_raises_on_functional_calls():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return CF.max_pool2d(CF.conv2d(x, self.weight), 2)

    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(NotImplementedError, match=r"cnnops\.functional\.conv2d.*cnnops\.revert"):
        prepare_fx(Functional(), get_default_qconfig_mapping("x86"), (x,))


def test_fx_sync_batch_norm_and_unpool_kwargs():
    """SyncBatchNorm (which is not a torch.nn.SyncBatchNorm subclass) and MaxUnpool with an
    output_size computed from a traced tensor, as SegNet-style decoders call it."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.SyncBatchNorm(3)
            self.pool = nn.MaxPool2d(2, return_indices=True)
            self.unpool = nn.MaxUnpool2d(2)

        def forward(self, x):
            y, i = self.pool(self.bn(x))
            return self.unpool(y, i, output_size=x.size())

    ref = Net().eval()
    model = cnnops.convert(copy.deepcopy(ref))
    traced = torch.fx.symbolic_trace(model)
    assert {type(traced.get_submodule(n.target)) for n in traced.graph.nodes if n.op == "call_module"} == {
        cnn.SyncBatchNorm, cnn.MaxPool2d, cnn.MaxUnpool2d}
    x = torch.randn(2, 3, 9, 9)
    assert_close(traced(x), ref(x))


def test_jit_trace_functional_with_shape_derived_arguments():
    """Ints computed from shapes reach cnnops.functional as 0-dim tensors under jit.trace: taken
    as their values (a TracerWarning says the trace fixes them), torch's results at that size."""
    w = torch.randn(4, 4, 3, 3)

    def f(M, x):
        y = M.conv2d(x, w, None, 1, w.size(-1) // 2)
        y = M.max_pool2d(y, x.size(-1) // 4)
        y = M.adaptive_avg_pool2d(y, (y.shape[-2] // 2, y.size(-1) // 2))
        y, i = M.max_pool2d(y, 2, return_indices=True)
        y = M.max_unpool2d(y, i, 2, output_size=[2 * s for s in y.shape[-2:]])
        return M.layer_norm(y, y.shape[-1:])

    x = torch.randn(2, 4, 16, 16)
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(lambda t: f(CF, t), x, check_trace=False)
    assert "cnnops::max_unpool_forward" in str(traced.graph)
    assert_close(traced(x), f(torch.nn.functional, x))


@pytest.mark.parametrize("make_module", [lambda: nn.Conv2d(3, 4, 3), lambda: nn.MaxPool2d(2, return_indices=True),
                                         lambda: nn.GroupNorm(1, 3), lambda: nn.BatchNorm2d(3),
                                         lambda: nn.InstanceNorm2d(3)],
                         ids=["conv", "maxpool", "groupnorm", "batchnorm", "instancenorm"])
def test_fx_symbolic_trace_of_a_module_itself(make_module):
    """The traced root's forward is traced (no call_module of itself), as torch traces its twin's:
    where torch's forward traces, cnnops' gives call_function nodes; where torch's raises
    TraceError (batch and instance norm check the input's rank), so does cnnops'."""
    ref = make_module().eval()
    model = cnnops.convert(copy.deepcopy(ref))
    try:
        traced_ref = torch.fx.symbolic_trace(ref)
    except torch.fx.proxy.TraceError:
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(model)
        return
    traced = torch.fx.symbolic_trace(model)
    assert [n.op for n in traced.graph.nodes] == [n.op for n in traced_ref.graph.nodes]
    assert all(n.target.__module__ == "cnnops.functional" for n in traced.graph.nodes if n.op == "call_function")
    x = torch.randn(2, 3, 8, 8)
    assert_close(traced(x), traced_ref(x))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_jit_script_empty_batch(train):
    """Batch 0 under script: torch's outputs and running statistics (NaN for instance norm)."""
    x = torch.randn(0, 3, 4, 4)
    for make_module in (lambda: nn.BatchNorm2d(3), lambda: nn.InstanceNorm2d(3, track_running_stats=True),
                        lambda: nn.GroupNorm(1, 3), lambda: nn.Conv2d(3, 2, 1), lambda: nn.MaxPool2d(2),
                        lambda: nn.AdaptiveAvgPool2d(2)):
        ref = make_module().train(train)
        scripted_ref, scripted = torch.jit.script(ref), torch.jit.script(cnnops.convert(copy.deepcopy(ref)))
        assert_close(scripted(x), scripted_ref(x))
        torch.testing.assert_close(list(scripted.state_dict().values()), list(scripted_ref.state_dict().values()),
                                   equal_nan=True)
