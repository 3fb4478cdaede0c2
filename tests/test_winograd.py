"""Winograd F(4x4, 3x3) and F(2x2, 3x3) convolution (csrc/cpu/conv_winograd.cpp) against torch: tile
edges, padding, batch sizes, groups, bias, fused ReLU, layouts, forward and every gradient (grad_input
is a stride-1 forward convolution, so it runs Winograd too; grad_weight has its own F(4x4) transforms),
each ISA, the size rules that choose the tile, and the switch cnnops.backends.cpu.allow_winograd.
Expected values come from torch (float64 reference); counters in the extension tell which path ran."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_torch, check_conv_against_torch, conv_tensors, run_with_cpu_isa

import cnnops
import cnnops.functional as CF
from cnnops import _C


def calls():
    return _C._cpu_winograd_calls()


@pytest.fixture(autouse=True)
def _winograd_on():
    """Switch on, and the size rules (where Winograd pays) replaced by "always", so small layers
    exercise every tile edge."""
    _C._set_cpu_winograd_min_tiles(0)
    try:
        with cnnops.backends.cpu.flags(allow_winograd=True):
            yield
    finally:
        _C._set_cpu_winograd_min_tiles(-1)


@pytest.fixture(params=["transformed", "streamed"])
def weight_modes(request):
    """The forward's two ways to U = G g G^T (stream_weights): all of it first, or slab by slab inside
    the products. Checks on teardown that every Winograd forward of the test took the one asked for."""
    streamed = request.param == "streamed"
    _C._set_cpu_winograd_weight_streaming(int(streamed))
    before, before_streamed = calls(), _C._cpu_winograd_streamed_calls()
    try:
        yield request.param
    finally:
        _C._set_cpu_winograd_weight_streaming(-1)
    forwards, streamed_forwards = calls() - before, _C._cpu_winograd_streamed_calls() - before_streamed
    assert streamed_forwards == (forwards if streamed else 0)


@pytest.fixture(params=[4, 2], ids=["F4", "F2"])
def tiles(request):
    """The forward's two tiles, F(4x4, 3x3) and F(2x2, 3x3) (winograd_tile), forced for every Winograd
    forward of the test (grad input's too); checks on teardown that each ran the one asked for."""
    _C._set_cpu_winograd_tile(request.param)
    before, before_small = calls(), _C._cpu_winograd_small_tile_calls()
    try:
        yield request.param
    finally:
        _C._set_cpu_winograd_tile(0)
    forwards, small = calls() - before, _C._cpu_winograd_small_tile_calls() - before_small
    assert small == (forwards if request.param == 2 else 0)


# Output sizes 1..13 (every remainder mod 4, odd and even), with padding 0 and 1.
SIZES = [(1, 1), (2, 3), (3, 1), (1, 13), (4, 4), (5, 7), (6, 9), (7, 13), (8, 5), (9, 11), (10, 10), (11, 6),
         (12, 12), (13, 8)]


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("out_size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_tile_edges_forward_and_gradients(out_size, padding):
    """Output sizes that are not multiples of the 4x4 or 2x2 tile; forward, grad_input, grad_weight and
    grad_bias. Forward and grad_input take Winograd (two calls)."""
    h, w = (s + 2 - 2 * padding for s in out_size)
    x, wt, b = conv_tensors(2, 2, 16, 24, (h, w), 3, 1, True, torch.float32)
    before = calls()
    check_conv_against_torch(2, x, wt, b, {"padding": padding}, torch.float32)
    # A 1x1 output without padding is one whole-window dot product per output channel
    # (conv_small.h), which conv_forward_any and the backward try first.
    whole_window = out_size == (1, 1) and padding == 0
    assert calls() - before == (0 if whole_window else 2)


@pytest.mark.parametrize("cin,cout", [(1, 1), (3, 5), (7, 9)])
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_few_channels(cin, cout):
    x, w, b = conv_tensors(2, 2, cin, cout, (6, 11), 3, 1, True, torch.float32)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.float32)
    assert calls() - before == 2


def test_default_size_rules():
    """Without the test override, Winograd is taken where it pays: a ResNet 64-channel 56x56
    layer (196 tiles), not a 512-channel 7x7 layer at batch 1 (4 tiles, 37 MB of transformed
    weights) nor a layer with few channels, nor a grouped layer of fewer than 64 channels a group
    (ResNeXt's 32 groups of 4 to 32), while 64 a group still pays; nor a layer with fewer than 64
    channels on either side on maps the 4x4 tiles do not divide (DenseNet's 128->32 at 14x14, forward
    and grad input, 32->128), while the same layer at 28x28 still pays."""
    _C._set_cpu_winograd_min_tiles(-1)
    cases = [((1, 64, 56, 56), (64, 64, 3, 3), 1, 2), ((1, 512, 7, 7), (512, 512, 3, 3), 1, 0),
             ((1, 8, 56, 56), (8, 8, 3, 3), 1, 0), ((1, 128, 56, 56), (128, 32, 3, 3), 4, 0),
             ((1, 128, 56, 56), (128, 64, 3, 3), 2, 2), ((8, 128, 14, 14), (32, 128, 3, 3), 1, 0),
             ((2, 128, 28, 28), (32, 128, 3, 3), 1, 2), ((8, 128, 14, 14), (64, 128, 3, 3), 1, 2)]
    for x_shape, w_shape, groups, expected in cases:
        x = torch.randn(x_shape, requires_grad=True)
        w = torch.randn(w_shape)
        before = calls()
        y = CF.conv2d(x, w, None, padding=1, groups=groups)
        y.backward(torch.ones_like(y))
        assert calls() - before == expected, (x_shape, w_shape, groups)


def test_small_tiles_default_size_rules():
    """Without the test overrides, F(2x2, 3x3) runs the layers of 128 channels and more whose maps leave
    F(4x4) fewer than 32 tiles but give F(2x2) at least 32 (512 channels at 7x7 from batch 2, 256 and
    384 channels at 13x13 and 14x14 at batch 1), forward and grad input; their grad weight stays direct
    (F(4x4) only). F(4x4) keeps the layers where it has 32 tiles; fewer F(2x2) tiles or 64 channels
    keep the direct path."""
    _C._set_cpu_winograd_min_tiles(-1)
    cases = [((2, 512, 7, 7), 512, 2, 2), ((4, 512, 7, 7), 512, 2, 2), ((1, 256, 14, 14), 256, 2, 2),
             ((1, 384, 13, 13), 384, 2, 2), ((1, 128, 14, 14), 256, 2, 2), ((2, 256, 14, 14), 256, 2, 0),
             ((1, 512, 7, 7), 512, 0, 0), ((1, 64, 14, 14), 64, 0, 0), ((1, 256, 14, 14), 64, 0, 0)]
    for x_shape, cout, expected, expected_small in cases:
        x = torch.randn(x_shape, requires_grad=True)
        w = (torch.randn(cout, x_shape[1], 3, 3) * (9 * x_shape[1]) ** -0.5).requires_grad_()
        before, before_small, before_weight = calls(), _C._cpu_winograd_small_tile_calls(), weight_calls()
        y = CF.conv2d(x, w, None, padding=1)
        y.backward(torch.ones_like(y))
        assert (calls() - before, _C._cpu_winograd_small_tile_calls() - before_small) == (expected, expected_small), (
            x_shape, cout)
        assert weight_calls() - before_weight == (1 if expected > expected_small else 0), (x_shape, cout)


def test_small_tile_switch_rejects_other_sizes():
    with pytest.raises(ValueError, match="0, 2 or 4"):
        _C._set_cpu_winograd_tile(3)


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_batch_sizes_and_bias(batch, bias):
    x, w, b = conv_tensors(2, batch, 16, 16, (9, 10), 3, 1, bias, torch.float32)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.float32)
    assert calls() - before == (2 if batch else 0)


@pytest.mark.parametrize("groups,cin,cout", [(2, 32, 48), (3, 48, 48), (2, 32, 32)])
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_groups(groups, cin, cout):
    x, w, b = conv_tensors(2, 2, cin, cout, (11, 7), 3, groups, True, torch.float32)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1, "groups": groups}, torch.float32)
    assert calls() - before == 2


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_layouts(layout):
    """channels_last runs the NHWC flavour of the kernel; other strided inputs are made dense."""
    x, w, b = conv_tensors(2, 2, 16, 32, (10, 13), 3, 1, True, torch.float32, layout=layout)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.float32,
                             grad_layout="channels_last" if layout == "channels_last" else "contiguous")
    assert calls() - before == 2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_channels_last_weight(layout):
    """A channels-last weight (OHWI in memory) is read in place by the weight transform
    (WinogradWeightView), forward and grad input's rotated kernel: no converted copy."""
    x, w, b = conv_tensors(2, 2, 16, 32, (10, 13), 3, 1, True, torch.float32, layout=layout,
                           weight_layout="channels_last")
    before, conversions = calls(), _C._cpu_conv_weight_conversions()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.float32, grad_layout=layout)
    assert calls() - before == 2  # the forward and grad input's transposed problem
    assert _C._cpu_conv_weight_conversions() == conversions


@pytest.mark.parametrize("cin,cout", [(16, 16), (24, 40), (40, 8)])
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_channels_last_wide(cin, cout):
    """Channels-last rows wider than a vector, channel counts with and without a partial group of
    16 (the channels-last copies transpose 16 x 16 blocks, the rest one by one)."""
    x, w, b = conv_tensors(2, 2, cin, cout, (7, 37), 3, 1, True, torch.float32, layout="channels_last")
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.float32, grad_layout="channels_last")
    assert calls() - before == 2


@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_many_tile_rows_and_blocks():
    """Enough tiles to split the work into several blocks of tile rows, each spanning samples."""
    x, w, b = conv_tensors(2, 5, 16, 16, (30, 29), 3, 1, True, torch.float32)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.float32, grads=("input",))
    assert calls() - before == 2


@pytest.mark.usefixtures("tiles")
def test_wide_rows():
    """Tile rows longer than one vector of tiles (chunks of 16 tiles on AVX-512)."""
    x, w, b = conv_tensors(2, 1, 16, 16, (5, 150), 3, 1, True, torch.float32)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.float32, grads=("input",))
    assert calls() - before == 2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_fused_relu(layout):
    """activation='relu' is applied in the output transform, after the bias."""
    x, w, b = conv_tensors(2, 2, 16, 24, (9, 7), 3, 1, True, torch.float32, layout=layout)
    before = calls()
    got = torch.ops.cnnops.conv_forward(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu")
    assert calls() - before == 1
    ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1)).float()
    assert_close_to_torch(got, ref, torch.float32, 16 * 9)
    assert (got >= 0).all()


@pytest.mark.parametrize("where", ["input", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_nonfinite_values_give_torch_results(where, value):
    """Winograd's transforms would spread an inf or NaN to outputs whose window does not hold it
    (0 * inf); such calls run the direct path, so NaN and inf land where torch puts them."""
    x, w, b = conv_tensors(2, 1, 16, 16, (12, 12), 3, 1, True, torch.float32)
    if where == "input":
        x[0, 3, 5, 6] = value
    else:
        w[2, 3, 1, 1] = value
    before = calls()
    got = CF.conv2d(x, w, b, padding=1)
    assert calls() == before
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert_close_to_torch(got[finite], ref[finite].float(), torch.float32, 16 * 9)


@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_result_does_not_depend_on_the_thread_count():
    """Work is split by sizes and threads differently, never the arithmetic of one output (streamed:
    two slabs of input channels summed in order, three of output channels)."""
    x, w, b = conv_tensors(2, 6, 136, 72, (21, 18), 3, 1, True, torch.float32)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(CF.conv2d(x, w, b, padding=1))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_switch_changes_the_path():
    """Off: the direct path (no Winograd call), which is bitwise what it was before Winograd
    existed; on: a different rounding, both within tolerance of torch's float64 result."""
    x, w, b = conv_tensors(2, 2, 32, 32, (14, 14), 3, 1, True, torch.float32)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1).float()
    with cnnops.backends.cpu.flags(allow_winograd=False):
        assert cnnops.backends.cpu.allow_winograd is False
        before = calls()
        direct = CF.conv2d(x, w, b, padding=1)
        assert calls() == before
    assert cnnops.backends.cpu.allow_winograd is True
    before = calls()
    wino = CF.conv2d(x, w, b, padding=1)
    assert calls() == before + 1
    assert not torch.equal(direct, wino)
    for got in (direct, wino):
        assert_close_to_torch(got, ref, torch.float32, 32 * 9)


def test_switch_read_at_run_time_under_compile():
    """The flag is read by the kernel on every call: a compiled function follows it without
    recompiling."""
    x, w, b = conv_tensors(2, 2, 16, 16, (12, 12), 3, 1, True, torch.float32)
    torch._dynamo.reset()
    f = torch.compile(lambda x, w, b: CF.conv2d(x, w, b, padding=1), backend="eager", fullgraph=True)
    before = calls()
    on = f(x, w, b)
    assert calls() == before + 1
    cnnops.backends.cpu.allow_winograd = False
    before = calls()
    off = f(x, w, b)
    assert calls() == before
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1).float()
    for got in (on, off):
        assert_close_to_torch(got, ref, torch.float32, 16 * 9)


def test_switch_rejects_non_bool():
    with pytest.raises(TypeError, match="bool"):
        cnnops.backends.cpu.allow_winograd = 1
    assert cnnops.backends.cpu.allow_winograd is True


@pytest.mark.parametrize("case", ["float64", "stride2", "dilation2", "depthwise", "5x5", "conv3d_depth2", "1x1"])
def test_other_convolutions_keep_the_direct_path(case):
    dims, groups, kernel, kwargs, dtype = 2, 1, 3, {"padding": 1}, torch.float32
    if case == "float64":
        dtype = torch.float64
    elif case == "stride2":
        kwargs = {"padding": 1, "stride": 2}
    elif case == "dilation2":
        kwargs = {"padding": 2, "dilation": 2}
    elif case == "depthwise":
        groups = 16
    elif case == "5x5":
        kernel, kwargs = 5, {"padding": 2}
    elif case == "conv3d_depth2":  # 3-d needs 3 taps in depth
        dims, kernel = 3, (2, 3, 3)
    elif case == "1x1":
        kernel, kwargs = 1, {}
    spatial = (6, 9, 9) if dims == 3 else (12, 12)
    x, w, b = conv_tensors(dims, 2, 16, 16, spatial, kernel, groups, True, dtype)
    before = calls()
    check_conv_against_torch(dims, x, w, b, dict(kwargs, groups=groups), dtype)
    assert calls() == before


def test_reduced_precision_computes_through_winograd():
    """bfloat16 runs the float32 kernels, so Winograd, within bfloat16's tolerance."""
    x, w, b = conv_tensors(2, 2, 16, 16, (9, 9), 3, 1, True, torch.bfloat16)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.bfloat16, grads=("input",))
    assert calls() - before == 2


@pytest.mark.usefixtures("weight_modes")
@pytest.mark.usefixtures("tiles")
def test_large_channels_and_values():
    """A ResNet-like layer: the error stays within the float32 tolerance at 256 channels."""
    x, w, b = conv_tensors(2, 2, 256, 128, (14, 14), 3, 1, True, torch.float32)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1}, torch.float32, grads=("input",))
    assert calls() - before == 2



@pytest.mark.usefixtures("weight_modes")
@pytest.mark.parametrize("padding", [0, 1, (1, 0, 1), (0, 1, 0)], ids=str)
@pytest.mark.parametrize("size", [(1, 4, 4), (3, 5, 7), (4, 9, 6), (2, 13, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout,weight_layout", [("contiguous", "contiguous"), ("channels_last", "contiguous"),
                                                  ("channels_last", "channels_last")])
@pytest.mark.usefixtures("tiles")
def test_3d_depth_taps(size, padding, layout, weight_layout):
    """conv3d 3x3x3 stride 1: each depth tap a 2-d F(4x4, 3x3), summed into M; input planes in the depth
    padding are zero. Forward and grad input (the turned kernel read in place, its depth taps reversed
    too) take Winograd, and grad weight: per depth tap kd, output plane od's Z against input plane
    od + kd - pad's V."""
    pads = (padding,) * 3 if isinstance(padding, int) else padding
    spatial = tuple(s + 2 - 2 * p for s, p in zip(size, pads))
    x, wt, b = conv_tensors(3, 2, 16, 24, spatial, 3, 1, True, torch.float32, layout=layout,
                            weight_layout=weight_layout)
    before, before_weight = calls(), _C._cpu_winograd_weight_calls()
    check_conv_against_torch(3, x, wt, b, {"padding": padding}, torch.float32, grad_layout=layout)
    assert calls() - before == 2
    assert _C._cpu_winograd_weight_calls() == before_weight + 1


@pytest.mark.usefixtures("weight_modes")
@pytest.mark.parametrize("groups,cin,cout", [(1, 136, 40), (2, 64, 48)])
@pytest.mark.usefixtures("tiles")
def test_3d_slabs_and_groups(groups, cin, cout):
    """3-d layers with partial slabs (streamed U per depth tap), partial vectors of input channels
    (grad weight's output transform) and groups."""
    x, w, b = conv_tensors(3, 1, cin, cout, (4, 6, 9), 3, groups, True, torch.float32)
    before, before_weight = calls(), _C._cpu_winograd_weight_calls()
    check_conv_against_torch(3, x, w, b, {"padding": 1, "groups": groups}, torch.float32, grads=("input", "weight"))
    assert calls() - before == 2
    assert _C._cpu_winograd_weight_calls() == before_weight + 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_3d_weight_gradient_blocks(layout):
    """64 + 64 channels at 6x56x56: grad weight's tile rows run in 3 blocks, which start inside an
    output plane and pair it with the input planes of its 3 depth taps (the first and last in the
    depth padding); against torch's float64 gradient."""
    x, w, _ = conv_tensors(3, 1, 64, 64, (6, 56, 56), 3, 1, False, torch.float32, layout=layout,
                           weight_layout="contiguous")
    go = torch.randn(1, 64, 6, 56, 56, generator=torch.Generator().manual_seed(5))
    if layout == "channels_last":
        go = go.contiguous(memory_format=torch.channels_last_3d)
    args = ([1] * 3, [1] * 3, [1] * 3, 1, [False, True, False])
    before = _C._cpu_winograd_weight_calls()
    got = torch.ops.cnnops.conv_backward(go, x, w, *args)[1]
    assert _C._cpu_winograd_weight_calls() == before + 1
    ref = torch.ops.aten.convolution_backward(go.double(), x.double(), w.double(), None, *args[:3], False, [0] * 3, 1,
                                              args[4])[1]
    assert_close_to_torch(got, ref.float(), torch.float32, 6 * 56 * 56)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_3d_default_size_rules(layout):
    """By default the benchmark's conv3d layer (32 channels, 16x28x28, batch 2) takes Winograd: forward, grad
    input and grad weight (channels-last too, where 2-d layers of 32 output channels take the
    transposed direct product)."""
    _C._set_cpu_winograd_min_tiles(-1)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 32, 16, 28, 28).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(32, 32, 3, 3, 3) / (27 * 32) ** 0.5).contiguous(memory_format=fmt).requires_grad_()
    before, before_weight = calls(), _C._cpu_winograd_weight_calls()
    y = CF.conv3d(x, w, None, padding=1)
    y.backward(torch.ones_like(y))
    assert calls() - before == 2
    assert _C._cpu_winograd_weight_calls() == before_weight + 1


@pytest.mark.usefixtures("weight_modes")
@pytest.mark.parametrize("groups,cin,cout", [(1, 136, 40), (1, 260, 33), (2, 272, 80), (1, 128, 64)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.usefixtures("tiles")
def test_weight_slab_edges(groups, cin, cout, layout):
    """Streamed U is made for slabs of 32 output x 128 input channels a group: channel counts that
    leave partial slabs on each side (and a partial 8-row panel: 33, 40 a group), several input slabs
    summed into M, groups."""
    x, w, b = conv_tensors(2, 2, cin, cout, (9, 10), 3, groups, True, torch.float32, layout=layout)
    before = calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1, "groups": groups}, torch.float32, grads=("input",),
                             grad_layout=layout)
    assert calls() - before == 2


def test_default_streaming_rule():
    """By default U is streamed when it is larger than 4 MB ((m + 2)^2 C_out C_in/groups floats): a
    256-channel layer's 9.4 MB (and its grad input's) but not a 128-channel layer's 2.4 MB; F(2x2)'s
    U of a 512-channel layer (16.8 MB) too. With U streamed the 512-channel 7x7 layer pays with
    F(4x4) from batch 8 (32 tiles) on; at batch 4 it runs F(2x2)."""
    _C._set_cpu_winograd_min_tiles(-1)
    cases = [((2, 256, 14, 14), (256, 256, 3, 3), 2, 2), ((2, 128, 28, 28), (128, 128, 3, 3), 2, 0),
             ((8, 512, 7, 7), (512, 512, 3, 3), 2, 2), ((4, 512, 7, 7), (512, 512, 3, 3), 2, 2)]
    for x_shape, w_shape, expected, expected_streamed in cases:
        x = torch.randn(x_shape, requires_grad=True)
        w = torch.randn(w_shape) * (9 * w_shape[1]) ** -0.5
        before, before_streamed = calls(), _C._cpu_winograd_streamed_calls()
        y = CF.conv2d(x, w, None, padding=1)
        y.backward(torch.ones_like(y))
        assert calls() - before == expected, (x_shape, w_shape)
        assert _C._cpu_winograd_streamed_calls() - before_streamed == expected_streamed, (x_shape, w_shape)


@pytest.mark.parametrize("channels,size", [(128, 28), (256, 14)])
@pytest.mark.usefixtures("tiles")
def test_trained_scale_layers_stay_inside_the_float32_tolerance(channels, size):
    """What benchmarks/results/winograd_cpu.md and docs/formulas.md claim: on ResNet-sized layers
    with weights of a trained layer's scale (N(0, 1/fan_in)), forward and grad_input through
    Winograd stay inside the float32 tolerance table against a float64 reference. (With N(0, 1)
    weights at 128 channels, outputs ~sqrt(fan_in), a few outputs per million exceed it: the
    Winograd-domain sums over C_in round at the transformed values' larger magnitude.)"""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, generator=gen).requires_grad_()
    w = (torch.randn(channels, channels, 3, 3, generator=gen) * (9 * channels) ** -0.5).requires_grad_()
    before = calls()
    y = CF.conv2d(x, w, padding=1)
    go = torch.randn(y.shape, generator=gen)
    (dx,) = torch.autograd.grad(y, x, go)
    assert calls() - before == 2  # forward and grad_input both ran Winograd
    xd, wd = x.detach().double().requires_grad_(), w.detach().double()
    ref = F.conv2d(xd, wd, padding=1)
    (ref_dx,) = torch.autograd.grad(ref, xd, go.double())
    assert_close_to_torch(y, ref, torch.float32, reduction=9 * channels, msg="forward")
    assert_close_to_torch(dx, ref_dx, torch.float32, reduction=9 * channels, msg="grad_input")


ISA_CHECK = r"""
import itertools, sys, torch, torch.nn.functional as F
import cnnops, cnnops.functional as CF
from cnnops import _C
print(torch.ops.cnnops.cpu_gemm_isa())
_C._set_cpu_winograd_min_tiles(0)
torch.manual_seed(0)
for (h, w), p, cl, (g, ci, co), streamed, tile in itertools.product(
        [(3, 3), (4, 4), (7, 13), (11, 6), (5, 40)], [0, 1], [False, True],
        [(1, 16, 24), (2, 32, 32), (1, 3, 5), (1, 136, 40)], [0, 1], [4, 2]):
    _C._set_cpu_winograd_weight_streaming(streamed)
    _C._set_cpu_winograd_tile(tile)
    x = torch.randn(2, ci, h + 2 - 2 * p, w + 2 - 2 * p)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    wt = torch.randn(co, ci // g, 3, 3, requires_grad=True)
    b = torch.randn(co, requires_grad=True)
    before, before_w = _C._cpu_winograd_calls(), _C._cpu_winograd_weight_calls()
    before_small = _C._cpu_winograd_small_tile_calls()
    ours = CF.conv2d(x, wt, b, padding=p, groups=g)
    go = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (x, wt, b), go)
    if _C._cpu_winograd_calls() - before != 2:
        sys.exit(f"Winograd not taken for {(h, w, p, cl, g)}")
    if _C._cpu_winograd_small_tile_calls() - before_small != (2 if tile == 2 else 0):
        sys.exit(f"F({tile}x{tile}, 3x3) not taken for {(h, w, p, cl, g)}")
    if _C._cpu_winograd_weight_calls() - before_w != 1:
        sys.exit(f"Winograd grad_weight not taken for {(h, w, p, cl, g)}")
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, wt, b))
    ref = F.conv2d(xd, wd, bd, padding=p, groups=g)
    exp = torch.autograd.grad(ref, (xd, wd, bd), go.double())
    for name, a, e in zip(("out", "dx", "dw", "db"), (ours,) + got, (ref,) + exp):
        err = ((a.double() - e).abs().max() / e.abs().max().clamp_min(1)).item()
        if not err < 1e-5:
            sys.exit(f"{(h, w, p, cl, g, tile)} {name}: relative error {err}")
for cl, streamed, tile in itertools.product([False, True], [0, 1], [4, 2]):  # 3-d: a 2-d transform per depth tap
    _C._set_cpu_winograd_weight_streaming(streamed)
    _C._set_cpu_winograd_tile(tile)
    x = torch.randn(2, 16, 4, 7, 9)
    wt = torch.randn(24, 16, 3, 3, 3)
    if cl:
        x, wt = (t.to(memory_format=torch.channels_last_3d) for t in (x, wt))
    x.requires_grad_()
    before = _C._cpu_winograd_calls()
    ours = CF.conv3d(x, wt, padding=1)
    go = torch.randn_like(ours)
    (dx,) = torch.autograd.grad(ours, x, go)
    if _C._cpu_winograd_calls() - before != 2:
        sys.exit(f"3-d Winograd not taken for {(cl, streamed, tile)}")
    xd = x.detach().double().requires_grad_()
    ref = F.conv3d(xd, wt.double(), padding=1)
    (ref_dx,) = torch.autograd.grad(ref, xd, go.double())
    for name, a, e in (("out", ours, ref), ("dx", dx, ref_dx)):
        err = ((a.double() - e).abs().max() / e.abs().max().clamp_min(1)).item()
        if not err < 1e-5:
            sys.exit(f"3-d {(cl, streamed, tile)} {name}: relative error {err}")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_each_isa_matches_torch(isa):
    """The transforms of both tiles (the weight gradient's too) are compiled per ISA (16, 8 and 4 tiles per
    vector): each one against torch."""
    result = run_with_cpu_isa(isa, ISA_CHECK, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == isa


# ---------------------------------------------------------------------------------------------
# the weight gradient: G^T [sum over tiles of (A dY A^T) .* (B^T d B)] G
# ---------------------------------------------------------------------------------------------


def weight_calls():
    return _C._cpu_winograd_weight_calls()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("out_size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_weight_gradient_tile_edges(out_size, padding, layout):
    """Output sizes that are not multiples of the 4x4 tile (the output gradient's tiles are
    zero past the edges), padding 0, 1 and 2; channels-last rows (moved 16 channels at a time,
    transposed, and element by element past the last whole vector of pixels) too."""
    h, w = (s + 2 - 2 * padding for s in out_size)
    if min(h, w) < 1:
        pytest.skip("no input of that size gives this output with padding 2")
    x, wt, b = conv_tensors(2, 2, 16, 24, (h, w), 3, 1, True, torch.float32, layout=layout)
    before = weight_calls()
    check_conv_against_torch(2, x, wt, b, {"padding": padding}, torch.float32, grads=("weight", "bias"))
    whole_window = out_size == (1, 1) and padding == 0  # conv_small.h's window kernels take it
    assert weight_calls() - before == (0 if whole_window else 1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("cin,cout,groups", [(16, 16, 1), (3, 5, 1), (32, 48, 2), (48, 48, 3), (13, 29, 1)])
def test_weight_gradient_batches_channels_groups(batch, cin, cout, groups, layout):
    x, w, b = conv_tensors(2, batch, cin, cout, (9, 10), 3, groups, False, torch.float32, layout=layout)
    before = weight_calls()
    check_conv_against_torch(2, x, w, b, {"padding": 1, "groups": groups}, torch.float32)
    assert weight_calls() - before == (1 if batch else 0)


def check_weight_gradient(n, cin, cout, size, padding=1, layout="contiguous"):
    """grad_weight alone (conv_backward with only the weight in the mask) against torch's float64
    one, with the tolerance of a sum over n * H_out * W_out terms."""
    x, w, _ = conv_tensors(2, n, cin, cout, size, 3, 1, False, torch.float32, layout=layout,
                           weight_layout="contiguous")
    out = [s + 2 * padding - 2 for s in size]
    go = torch.randn(n, cout, *out, generator=torch.Generator().manual_seed(5))
    if layout == "channels_last":
        go = go.contiguous(memory_format=torch.channels_last)
    args = ([1, 1], [padding] * 2, [1, 1], 1, [False, True, False])
    before = weight_calls()
    got = torch.ops.cnnops.conv_backward(go, x, w, *args)[1]
    assert weight_calls() - before == 1
    ref = torch.ops.aten.convolution_backward(go.double(), x.double(), w.double(), None, *args[:3], False, [0, 0], 1,
                                              args[4])[1]
    assert_close_to_torch(got, ref.float(), torch.float32, n * out[0] * out[1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_gradient_several_blocks(layout):
    """128 + 128 channels at 56x56: the tiles run in blocks of tile rows (about 8 MB of
    transforms each) that span samples, added into dU in order."""
    check_weight_gradient(3, 128, 128, (56, 56), layout=layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("n,cin,cout,size", [(1, 16, 16, (5, 150)), (2, 256, 128, (14, 14)), (8, 512, 512, (7, 7)),
                                             (2, 64, 64, (56, 56)), (2, 24, 40, (17, 19))])
def test_weight_gradient_wide_rows_and_large_layers(n, cin, cout, size, layout):
    check_weight_gradient(n, cin, cout, size, layout=layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cin,size", [(16, (9, 10)), (13, (9, 10)), (40, (7, 7)), (24, (6, 21))])
def test_weight_gradient_channels_last_weight(cin, size, layout):
    """A channels-last weight gets its gradient written channels-last (OHWI) by the output
    transform itself, on the NCHW and the NHWC kernels' routes, with the same sums: bitwise the
    gradient of the contiguous weight."""
    x, w, _ = conv_tensors(2, 3, cin, 24, size, 3, 1, False, torch.float32, layout=layout,
                           weight_layout="contiguous")
    go = torch.randn(3, 24, *size, generator=torch.Generator().manual_seed(7))
    if layout == "channels_last":
        go = go.contiguous(memory_format=torch.channels_last)
    args = ([1, 1], [1, 1], [1, 1], 1, [False, True, False])
    before = weight_calls()
    oihw = torch.ops.cnnops.conv_backward(go, x, w, *args)[1]
    ohwi = torch.ops.cnnops.conv_backward(go, x, w.contiguous(memory_format=torch.channels_last), *args)[1]
    assert weight_calls() - before == 2
    assert ohwi.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ohwi, oihw)
    ref = torch.ops.aten.convolution_backward(go.double(), x.double(), w.double(), None, *args[:3], False, [0, 0], 1,
                                              args[4])[1]
    assert_close_to_torch(ohwi, ref.float(), torch.float32, 3 * size[0] * size[1])


@pytest.mark.parametrize("where", ["input", "grad_output"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_gradient_nonfinite_takes_the_direct_path(where, value, layout):
    x, w, _ = conv_tensors(2, 2, 16, 16, (12, 12), 3, 1, False, torch.float32, layout=layout,
                           weight_layout="contiguous")
    go = torch.randn(2, 16, 12, 12)
    if layout == "channels_last":
        go = go.contiguous(memory_format=torch.channels_last)
    (x if where == "input" else go)[1, 3, 5, 6] = value
    before = weight_calls()
    _, got, _ = torch.ops.cnnops.conv_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [False, True, False])
    assert weight_calls() == before
    ref = torch.ops.aten.convolution_backward(go.double(), x.double(), w.double(), None, [1, 1], [1, 1], [1, 1],
                                              False, [0, 0], 1, [False, True, False])[1]
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert_close_to_torch(got[finite], ref[finite].float(), torch.float32, 2 * 12 * 12)


def test_weight_gradient_switch_and_float64_keep_the_direct_path():
    x, w, _ = conv_tensors(2, 2, 16, 16, (12, 12), 3, 1, False, torch.float32)
    go = torch.randn(2, 16, 12, 12)
    args = ([1, 1], [1, 1], [1, 1], 1, [False, True, False])
    before = weight_calls()
    with cnnops.backends.cpu.flags(allow_winograd=False):
        direct = torch.ops.cnnops.conv_backward(go, x, w, *args)[1]
    torch.ops.cnnops.conv_backward(go.double(), x.double(), w.double(), *args)
    assert weight_calls() == before
    wino = torch.ops.cnnops.conv_backward(go, x, w, *args)[1]
    assert weight_calls() == before + 1
    ref = torch.ops.aten.convolution_backward(go.double(), x.double(), w.double(), None, *args[:3], False, [0, 0],
                                              1, args[4])[1].float()
    assert not torch.equal(direct, wino)
    for got in (direct, wino):
        assert_close_to_torch(got, ref, torch.float32, 2 * 12 * 12)
    cl = torch.channels_last  # channels-last runs the same sums: bitwise the NCHW result
    wino_cl = torch.ops.cnnops.conv_backward(go.contiguous(memory_format=cl), x.contiguous(memory_format=cl), w, *args)
    assert weight_calls() == before + 2
    assert torch.equal(wino_cl[1], wino)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_gradient_does_not_depend_on_the_thread_count(layout):
    x, w, _ = conv_tensors(2, 3, 128, 64, (40, 44), 3, 1, False, torch.float32, layout=layout,
                           weight_layout="contiguous")
    go = torch.randn(3, 64, 40, 44)
    if layout == "channels_last":
        go = go.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.cnnops.conv_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [False, True, False])[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_weight_gradient_default_size_rules():
    """Without the override, the weight gradient takes Winograd where the forward does."""
    _C._set_cpu_winograd_min_tiles(-1)
    for x_shape, w_shape, expected in [((1, 64, 56, 56), (64, 64, 3, 3), 1), ((1, 512, 7, 7), (512, 512, 3, 3), 0)]:
        x, w = torch.randn(x_shape), torch.randn(w_shape, requires_grad=True)
        before = weight_calls()
        CF.conv2d(x, w, None, padding=1).sum().backward()
        assert weight_calls() - before == expected, x_shape
