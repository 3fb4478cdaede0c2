"""Degenerate shapes, differentially against torch: zero-size dims in every position (batch,
channels, each spatial dim, kernel), 1-D and 0-D inputs, empty running statistics, groups 0 or
larger than the channel count. cnnops must give torch's outcome: the same exception type, or
the same output (shape and values) and gradient shapes. The cases where torch returns a result
that cnnops cannot compute are listed in GAPS: there cnnops must raise NotImplementedError."""
import pytest
import torch
import torch.nn.functional as F

import cnnops.functional as C


def T(*shape, grad=False):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    return t.requires_grad_(grad)


def Z(*shape):
    return torch.zeros(shape, dtype=torch.float64)


def Ones(*shape):
    return torch.ones(shape, dtype=torch.float64)


def idx(*shape):
    return torch.zeros(shape, dtype=torch.int64)


CASES = {}


def case(name, fn, *args, **kwargs):
    CASES[name] = (fn, args, kwargs)


# --- convolution ----------------------------------------------------------------------------
for d in (1, 2, 3):
    sp, k = (5,) * d, (3,) * d
    case(f"conv{d}d-batch0", f"conv{d}d", T(0, 2, *sp, grad=True), T(4, 2, *k, grad=True), T(4, grad=True))
    case(f"conv{d}d-out-channels0", f"conv{d}d", T(1, 2, *sp), T(0, 2, *k))
    case(f"conv{d}d-in-channels0", f"conv{d}d", T(1, 0, *sp), T(4, 0, *k))
    case(f"conv{d}d-weight-in-channels0", f"conv{d}d", T(1, 2, *sp), T(4, 0, *k))
    case(f"conv{d}d-groups0", f"conv{d}d", T(1, 2, *sp), T(4, 2, *k), groups=0)
    case(f"conv{d}d-groups-above-channels", f"conv{d}d", T(1, 2, *sp), T(4, 1, *k), groups=3)
    case(f"conv{d}d-groups-above-out-channels", f"conv{d}d", T(1, 8, *sp), T(4, 1, *k), groups=8)
    case(f"conv{d}d-1d-input", f"conv{d}d", T(5), T(4, 2, *k))
    case(f"conv{d}d-0d-input", f"conv{d}d", T(), T(4, 2, *k))
    case(f"conv{d}d-unbatched", f"conv{d}d", T(2, *sp, grad=True), T(4, 2, *k, grad=True))
    for i in range(d):
        zero = tuple(0 if j == i else 5 for j in range(d))
        case(f"conv{d}d-spatial{i}-0", f"conv{d}d", T(1, 2, *zero), T(4, 2, *k))
        case(f"conv{d}d-spatial{i}-0-padded", f"conv{d}d", T(1, 2, *zero), T(4, 2, *((1,) * d)), padding=1)
        kzero = tuple(0 if j == i else 3 for j in range(d))
        case(f"conv{d}d-kernel{i}-0", f"conv{d}d", T(1, 2, *sp), T(4, 2, *kzero))

# --- pooling --------------------------------------------------------------------------------
for d in (1, 2, 3):
    sp = (4,) * d
    for kind in ("max", "avg"):
        fn = f"{kind}_pool{d}d"
        case(f"{fn}-batch0", fn, T(0, 2, *sp, grad=True), 2)
        case(f"{fn}-channels0", fn, T(1, 0, *sp), 2)
        case(f"{fn}-unbatched-channels0", fn, T(0, *sp), 2)
        case(f"{fn}-1d-input", fn, T(4), 2)
        case(f"{fn}-0d-input", fn, T(), 2)
        case(f"{fn}-kernel0", fn, T(1, 2, *sp), 0)
        for i in range(d):
            zero = tuple(0 if j == i else 4 for j in range(d))
            case(f"{fn}-spatial{i}-0", fn, T(1, 2, *zero), 2)
            case(f"{fn}-batch0-spatial{i}-0", fn, T(0, 2, *zero), 2)
    for kind in ("max", "avg"):
        fn = f"adaptive_{kind}_pool{d}d"
        case(f"{fn}-batch0", fn, T(0, 2, *sp, grad=True), 2)
        case(f"{fn}-channels0", fn, T(1, 0, *sp), 2)
        case(f"{fn}-all0", fn, T(0, 0, *((0,) * d)), 1)
        case(f"{fn}-output0", fn, T(1, 2, *sp), 0)
        case(f"{fn}-1d-input", fn, T(4), 2)
        case(f"{fn}-0d-input", fn, T(), 2)
        for i in range(d):
            zero = tuple(0 if j == i else 4 for j in range(d))
            case(f"{fn}-spatial{i}-0", fn, T(1, 2, *zero), 2)
            case(f"{fn}-batch0-spatial{i}-0", fn, T(0, 2, *zero), 2)
    fn = f"max_unpool{d}d"
    case(f"{fn}-batch0", fn, T(0, 2, *sp), idx(0, 2, *sp), 2)
    case(f"{fn}-channels0", fn, T(1, 0, *sp), idx(1, 0, *sp), 2)
    case(f"{fn}-1d-input", fn, T(4), idx(4), 2)
    case(f"{fn}-0d-input", fn, T(), idx(), 2)
    for i in range(d):
        zero = tuple(0 if j == i else 4 for j in range(d))
        case(f"{fn}-spatial{i}-0", fn, T(1, 2, *zero), idx(1, 2, *zero), 2)

# --- normalization --------------------------------------------------------------------------
for shape in [(0, 3), (0, 3, 4), (2, 0), (2, 0, 4), (2, 3, 0), (0, 0, 0)]:
    s = "x".join(map(str, shape))
    c = shape[1]
    for training in (False, True):
        case(f"batch_norm-{s}-train{int(training)}", "batch_norm", T(*shape), Z(c), Ones(c),
             T(c), T(c), training)
    case(f"batch_norm-{s}-eval-no-stats", "batch_norm", T(*shape), None, None)
    case(f"group_norm-{s}-groups1", "group_norm", T(*shape), 1)
    case(f"instance_norm-{s}", "instance_norm", T(*shape))
    case(f"layer_norm-{s}", "layer_norm", T(*shape), shape[-1:])
case("batch_norm-batch0-affine", "batch_norm", T(0, 3, 2, grad=True), Z(3), Ones(3), T(3, grad=True), T(3, grad=True),
     True)
case("batch_norm-channels0-affine", "batch_norm", T(2, 0, 2), Z(0), Ones(0), T(0), T(0), True)
case("instance_norm-batch0-running-stats", "instance_norm", T(0, 3, 4, grad=True), Z(3), Ones(3), T(3, grad=True),
     T(3, grad=True))
case("instance_norm-spatial0-running-stats", "instance_norm", T(2, 3, 0), Z(3), Ones(3), T(3), T(3))
case("batch_norm-1d-input", "batch_norm", T(3), Z(3), Ones(3))
case("batch_norm-0d-input", "batch_norm", T(), Z(1), Ones(1))
case("batch_norm-empty-running-stats", "batch_norm", T(2, 3), Z(0), Ones(0))
case("batch_norm-empty-running-stats-train", "batch_norm", T(2, 3), Z(0), Ones(0), None, None, True)
case("batch_norm-empty-stats-channels0", "batch_norm", T(2, 0), Z(0), Ones(0))
case("instance_norm-empty-running-stats", "instance_norm", T(2, 3, 4), Z(0), Ones(0))
case("instance_norm-1d-input", "instance_norm", T(4))
case("group_norm-groups0", "group_norm", T(2, 4, 3), 0)
case("group_norm-groups-above-channels", "group_norm", T(2, 4, 3), 8)
case("group_norm-groups-above-channels0", "group_norm", T(2, 0, 3), 2)
case("group_norm-1d-input", "group_norm", T(4), 1)
case("group_norm-0d-input", "group_norm", T(), 1)
case("layer_norm-0d-input", "layer_norm", T(), [])
case("layer_norm-1d-input", "layer_norm", T(4, grad=True), [4])
case("layer_norm-normalized0", "layer_norm", T(2, 0), [0])
case("layer_norm-normalized0-leading", "layer_norm", T(2, 0, 3), [0, 3])
case("layer_norm-leading0", "layer_norm", T(0, 3, grad=True), [3])

# --- found by longer fuzz runs ---------------------------------------------------------------
for d in (1, 2, 3):
    sp, k, one = (5,) * d, (3,) * d, (1,) * d
    # torch's empty path for a batch-0 input: dilation 0 accepted, a zero-size kernel an IndexError
    case(f"conv{d}d-batch0-dilation0", f"conv{d}d", T(0, 2, *sp, grad=True), T(4, 2, *k, grad=True), T(4, grad=True),
         1, 0, 0)
    case(f"conv{d}d-batch0-same-dilation0", f"conv{d}d", T(0, 2, *sp, grad=True), T(4, 2, *k, grad=True), None,
         1, "same", 0)
    case(f"conv{d}d-same-dilation0", f"conv{d}d", T(1, 2, *sp), T(4, 2, *k), None, 1, "same", 0)
    case(f"conv{d}d-batch0-same-kernel0", f"conv{d}d", T(0, 2, *sp), T(4, 2, *((0,) * d)), None, 1, "same")
    for i in range(d):
        kzero = tuple(0 if j == i else 3 for j in range(d))
        case(f"conv{d}d-batch0-kernel{i}-0-bias", f"conv{d}d", T(0, 2, *sp), T(4, 2, *kzero), T(4))
        case(f"conv{d}d-batch0-kernel{i}-0", f"conv{d}d", T(0, 2, *sp), T(4, 2, *kzero))
    sp = (4,) * d
    for kind in ("max", "avg"):
        fn = f"adaptive_{kind}_pool{d}d"
        case(f"{fn}-unbatched-channels0", fn, T(0, *sp, grad=True), 2)
        if kind == "avg" and d > 1:
            case(f"{fn}-0d-input-output1", fn, T(), 1)
            case(f"{fn}-1d-input-output1", fn, T(4), 1)
    fn = f"max_unpool{d}d"
    case(f"{fn}-unbatched-channels0", fn, T(0, *sp, grad=True), idx(0, *sp), 2)
    # an empty output_size within one stride of the default: torch returns the empty output
    # without reading the indices, and its backward fails gathering at them
    out0 = [0] + [1] * (d - 1)
    case(f"{fn}-output0", fn, T(1, 2, *one), idx(1, 2, *one) + 7, 1, 2, 0, out0)
    case(f"{fn}-output0-backward", fn, T(1, 2, *one, grad=True), idx(1, 2, *one), 1, 2, 0, out0)
    case(f"{fn}-unbatched-output0", fn, T(2, *one), idx(2, *one), 1, 2, 0, out0)
# a one-entry kernel_size for 2d gives a one-entry output_size whose value overflows int64:
# torch's argument parser fails (TypeError) before the op checks the length
case("max_unpool2d-overflowing-short-output-size", "max_unpool2d", T(0, 0, 0, 3), idx(), [0], 2**62)
# instance norm of an empty input: torch copies the running statistics back only when it
# computed them (use_input_stats), broadcasting its per-channel NaN into them
for s in [(1, 0), (1, 0, 3), (0, 3, 2)]:
    name = "x".join(map(str, s))
    for stats in (False, True):
        case(f"instance_norm-{name}-0d-stats-input-stats{int(stats)}", "instance_norm", T(*s), Z(), Ones(), None, None,
             stats)
        case(f"instance_norm-{name}-empty-stats-input-stats{int(stats)}", "instance_norm", T(*s), Z(0), Ones(0), None,
             None, stats)

# torch repeats weight, bias and the statistics N times before it indexes the empty weight
case("instance_norm-empty-2d-running-var", "instance_norm", T(0, 0, 0), None, Z(0, 0), None, T(0))
case("instance_norm-empty-2d-weight", "instance_norm", T(0, 3, 2), Z(3), Ones(3), Z(3, 1), T(0))
# torch casts running_mean of another dtype than the parameters' with running_var, even absent
case("instance_norm-empty-mixed-running-mean-no-var", "instance_norm", T(0, 3, 2), Z(3).float(), None)
case("instance_norm-empty-mixed-weight-no-var", "instance_norm", T(0, 3, 2), Z(3), None, Ones(3).float())
case("instance_norm-empty-same-dtype-no-var", "instance_norm", T(0, 3, 2), Z(3), None, Ones(3))
# per-channel tensors of rank 2: batch norm's kernels read the statistics as vectors; instance
# norm repeats all four along one dim
for train in (False, True):
    case(f"batch_norm-2d-running-mean-train{int(train)}", "batch_norm", T(2, 3, 4), Z(3, 1), Ones(3), None, None, train)
    case(f"batch_norm-2d-running-var-train{int(train)}", "batch_norm", T(2, 3, 4), Z(3), Ones(1, 3), None, None, train)
    for i, name in enumerate(("running-mean", "running-var", "weight", "bias")):
        params = [Z(3), Ones(3), Ones(3), Z(3)]
        params[i] = params[i].view(3, 1)
        case(f"instance_norm-2d-{name}-input-stats{int(train)}", "instance_norm", T(2, 3, 4), *params, train)
case("instance_norm-1x1x0-0d-running-var", "instance_norm", T(1, 1, 0), None, Ones())
case("batch_norm-1d-input-running-var-requires-grad", "batch_norm", T(1), Z(0), Z(0).requires_grad_())
case("instance_norm-momentum-beyond-float32", "instance_norm", T(2, 3, 4).float(), Z(3).float(), Ones(3).float(), None,
     None, True, 1e308)
case("max_unpool3d-stride-4-elements", "max_unpool3d", T(0, 1, 1, 1, 1), idx(0, 1, 1, 1, 1), 1, [1, 1, 1, 0])
case("max_unpool3d-padding-2-elements", "max_unpool3d", T(1, 1, 2, 2, 2), idx(1, 1, 2, 2, 2), 2, 2, [0, 0])

# torch returns a result that cnnops cannot compute: cnnops must say so (NotImplementedError)
GAPS = {f"conv{d}d-in-channels0" for d in (1, 2, 3)}


def _run(module, name, args, kwargs):
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = getattr(module, name)(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = ()
    if leaves and outs[0].requires_grad:
        grads = torch.autograd.grad(outs[0].sum(), leaves, allow_unused=True)
    return outs, grads, args


@pytest.mark.parametrize("name", sorted(CASES))
def test_degenerate_shape_as_torch(name):
    fn, args, kwargs = CASES[name]
    try:
        expected = _run(F, fn, args, kwargs)
    except Exception as e:  # noqa: BLE001
        assert name not in GAPS, f"{name}: listed as a gap, but torch raises {type(e).__name__}"
        with pytest.raises(type(e)):
            _run(C, fn, args, kwargs)
        return
    if name in GAPS:
        with pytest.raises(NotImplementedError):
            _run(C, fn, args, kwargs)
        return
    outs, grads, used = _run(C, fn, args, kwargs)
    want_outs, want_grads, want_used = expected
    assert [o.shape for o in outs] == [o.shape for o in want_outs]
    for o, w in zip(outs, want_outs):
        torch.testing.assert_close(o, w, equal_nan=True)
    assert [None if g is None else g.shape for g in grads] == [None if g is None else g.shape for g in want_grads]
    for g, w in zip(grads, want_grads):
        if g is not None:
            torch.testing.assert_close(g, w, equal_nan=True)
    # running statistics updated in place, as torch's
    for a, w in zip(used, want_used):
        if isinstance(a, torch.Tensor) and not a.requires_grad:
            torch.testing.assert_close(a, w, equal_nan=True)
