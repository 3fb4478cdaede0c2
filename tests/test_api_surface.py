"""The public surface of cnnops, against torch, the README and docs/support.md.

1. Every name in cnnops.functional.__all__ has torch.nn.functional's signature (parameter names,
   defaults, kinds); every name in cnnops.nn.__all__ subclasses its torch.nn twin and keeps the
   signatures of its constructor and of every public method cnnops defines (forward, ...).
2. The README's API table names every public name (cnnops.*, cnnops.functional.*, cnnops.nn.*,
   cnnops.autograd.*), and every cnnops name the table mentions exists.
3. Every "NotImplementedError" / "error" claim of the support matrix (docs/support.md) is
   asserted here, each with what torch does, so the test notices when either side changes; the
   matrix names every public module and uses only its legend's words.

Expected signatures come from torch itself: inspect.signature where torch has one, else the
first line of torch's docstring (its builtins document their signature there).
"""
import ast
import inspect
import os
import re

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.autograd as CA
import cnnops.functional as CF
import cnnops.nn as CN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SUPPORT = os.path.join(ROOT, "docs", "support.md")


# --------------------------------------------------------------------------------------------
# 1. signatures
# --------------------------------------------------------------------------------------------


def _params(sig, skip_self=False):
    params = list(sig.parameters.values())
    if skip_self and params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.default, p.kind) for p in params]


def _docstring_signature(fn, name):
    """torch's builtins (F.conv2d, F.avg_pool2d, ...) have no inspectable signature; their
    docstring starts with it: 'conv2d(input, weight, bias=None, ...) -> Tensor'."""
    first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    match = re.match(rf"{name}\((.*)\)", first)
    if not match:
        return None
    tree = ast.parse(f"def f({match.group(1)}): pass")
    ns = {}
    exec(compile(tree, "<torch docstring>", "exec"), ns)  # noqa: S102 - parses torch's own docstring
    return inspect.signature(ns["f"])


def _torch_functional_signature(name):
    fn = getattr(F, name)
    try:
        sig = inspect.signature(fn)
        # boolean_dispatch wrappers (max_pool2d, adaptive_max_pool2d) show (*args, **kwargs)
        if not any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
            return sig
    except (TypeError, ValueError):
        pass
    sig = _docstring_signature(fn, name)
    if sig is None and hasattr(F, f"{name}_with_indices"):
        sig = inspect.signature(getattr(F, f"{name}_with_indices"))
    assert sig is not None, f"no way to read torch's signature of F.{name}"
    return sig


@pytest.mark.parametrize("name", CF.__all__)
def test_functional_signature_matches_torch(name):
    assert callable(getattr(CF, name)), name
    assert hasattr(F, name), f"cnnops.functional.{name} has no torch.nn.functional twin"
    ours = _params(inspect.signature(getattr(CF, name)))
    theirs = _params(_torch_functional_signature(name))
    assert [p[:2] for p in ours] == [p[:2] for p in theirs], f"{name}: {ours} vs torch {theirs}"
    # keyword-only / positional-only markers as in torch (docstring signatures are plain)
    assert [p[2] for p in ours] == [p[2] for p in theirs], name


def _torch_twin(name):
    """The torch.nn class a cnnops.nn class stands in for: the same name, or for the fused
    conv+activation modules the convolution they extend."""
    twin = getattr(torch.nn, name, None)
    if twin is None:
        match = re.fullmatch(r"Conv[A-Za-z]+([123]d)", name)
        twin = getattr(torch.nn, f"Conv{match.group(1)}") if match else None
    return twin


# Modules that copy their twin's interface instead of subclassing it, and why.
MIRRORS = {
    "SyncBatchNorm": "DistributedDataParallel refuses torch.nn.SyncBatchNorm instances in CPU models, "
                     "so cnnops' (which also runs on gloo) mirrors it from torch's _BatchNorm",
}


@pytest.mark.parametrize("name", CN.__all__)
def test_module_subclasses_torch_twin_with_same_signatures(name):
    cls = getattr(CN, name)
    twin = _torch_twin(name)
    assert twin is not None, f"cnnops.nn.{name}: no torch.nn twin known to this test"
    assert isinstance(cls, type)
    if name in MIRRORS:
        assert issubclass(cls, torch.nn.Module) and not issubclass(cls, twin), MIRRORS[name]
    else:
        assert issubclass(cls, twin), f"cnnops.nn.{name} must subclass torch.nn.{twin.__name__}"
    assert _params(inspect.signature(cls)) == _params(inspect.signature(twin)), f"{name}.__init__"
    # every public method cnnops writes itself (forward, convert_sync_batchnorm, ...) keeps
    # torch's parameters
    checked = 0
    for attr in dir(cls):
        if attr.startswith("_") or not hasattr(twin, attr):
            continue
        ours = inspect.getattr_static(cls, attr)
        func = getattr(ours, "__func__", ours)
        if not callable(func) or not getattr(func, "__module__", "").startswith("cnnops"):
            continue
        assert _params(inspect.signature(getattr(cls, attr)), True) == \
               _params(inspect.signature(getattr(twin, attr)), True), f"{name}.{attr}"
        checked += 1
    assert checked >= 1 or name.startswith(("Conv", "InstanceNorm")), \
        f"{name}: expected cnnops to define forward (conv and instance norm override a helper instead)"


def test_module_forward_is_cnnops():
    """The modules that override a torch helper instead of forward still reach cnnops."""
    assert CN.Conv2d._conv_forward.__module__.startswith("cnnops")
    assert CN.InstanceNorm2d._apply_instance_norm.__module__.startswith("cnnops")


# --------------------------------------------------------------------------------------------
# 2. README API table
# --------------------------------------------------------------------------------------------


def _readme_section(title):
    text = open(README, encoding="utf-8").read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _expand_dims(text):
    """'cnnops.nn.Conv1d/2d/3d' -> 'cnnops.nn.Conv1d cnnops.nn.Conv2d cnnops.nn.Conv3d'."""
    return re.sub(r"([\w.]+?)1d/2d/3d", lambda m: " ".join(f"{m.group(1)}{d}d" for d in (1, 2, 3)), text)


def _public_autograd_functions():
    return sorted(name for name, obj in vars(CA).items()
                  if not name.startswith("_") and isinstance(obj, type)
                  and issubclass(obj, torch.autograd.Function) and obj.__module__ == CA.__name__)


def _public_names():
    names = [f"cnnops.functional.{n}" for n in CF.__all__] + [f"cnnops.nn.{n}" for n in CN.__all__]
    names += [f"cnnops.autograd.{n}" for n in _public_autograd_functions()]
    names += [f"cnnops.{n}" for n in cnnops.__all__ if n not in ("autograd", "functional", "nn")]
    return names


@pytest.mark.parametrize("qualified", _public_names())
def test_readme_api_table_lists_every_public_name(qualified):
    table = _expand_dims(_readme_section("API"))
    assert re.search(rf"(?<![\w.]){re.escape(qualified)}(?!\w)", table), f"README's API table does not name {qualified}"


def test_readme_api_names_exist():
    """Every cnnops name in the API table exists."""
    missing = []
    for row in _readme_section("API").splitlines():
        for qualified in re.findall(r"`(cnnops\.[\w.]+)", _expand_dims(row.replace("`", "` `"))):
            obj = cnnops
            for part in qualified.split(".")[1:]:
                if not hasattr(obj, part):
                    missing.append(qualified)
                    break
                obj = getattr(obj, part)
    assert not missing, f"README names that do not exist: {missing}"


# --------------------------------------------------------------------------------------------
# 3. the support matrix (docs/support.md), and what it says raises
# --------------------------------------------------------------------------------------------


def _support_rows():
    """(section, cells) of every table row of docs/support.md, header and separator rows left out."""
    rows, section = [], None
    with open(SUPPORT, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("|") and not line.startswith(("| argument", "| feature", "| ---")):
                rows.append((section, [c.strip() for c in line.strip().strip("|").split("|")]))
    return rows


def test_support_matrix_uses_its_legend():
    rows = _support_rows()
    assert len(rows) > 60, f"docs/support.md: only {len(rows)} table rows found"
    allowed = {"CPU": {"yes", "NIE", "yes, gloo", ""}, "CUDA": {"built", "NIE", "built, NCCL", ""}}
    for section, cells in rows:
        assert len(cells) == 4, f"docs/support.md ({section}): a row with {len(cells)} cells: {cells}"
        for column, value in zip(("CPU", "CUDA"), cells[1:3]):
            assert value in allowed[column], f"docs/support.md ({section}): {column} column says {value!r}: {cells}"


def test_support_matrix_names_every_public_module():
    text = _expand_dims(open(SUPPORT, encoding="utf-8").read())
    words = set(re.findall(r"\w+", text))
    prefixes = [p for p in re.findall(r"(\w+)\*", text)]  # `MaxPool*`: every MaxPool...
    missing = [n for n in CN.__all__ if n not in words and not any(n.startswith(p) for p in prefixes)]
    assert not missing, f"docs/support.md does not name {missing}"


def _int_tensor(shape, dtype):
    return torch.randint(0, 5, shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.complex64, torch.complex128])
def test_conv_integer_and_complex_not_implemented(dtype):
    make = (lambda s: torch.randn(s, dtype=dtype)) if dtype.is_complex else (lambda s: _int_tensor(s, dtype))
    x, w = make((2, 3, 6, 6)), make((4, 3, 3, 3))
    assert F.conv2d(x, w, padding=1).dtype == dtype  # torch computes it on the CPU
    with pytest.raises(NotImplementedError, match="dtype"):
        CF.conv2d(x, w, padding=1)


def test_conv_zero_input_channels_not_implemented():
    x, w = torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3)
    assert F.conv2d(x, w).shape == (2, 0, 3, 3)  # torch returns an empty output
    with pytest.raises(NotImplementedError, match="zero channels"):
        CF.conv2d(x, w)


POOLS = {
    "max_pool2d": lambda M, x: M.max_pool2d(x, 2),
    "avg_pool2d": lambda M, x: M.avg_pool2d(x, 2),
    "adaptive_avg_pool2d": lambda M, x: M.adaptive_avg_pool2d(x, 2),
    "adaptive_max_pool2d": lambda M, x: M.adaptive_max_pool2d(x, 2),
    "max_unpool2d": lambda M, x: M.max_unpool2d(x, torch.zeros(x.shape, dtype=torch.int64), 2),
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("op", list(POOLS))
def test_integer_pools_not_implemented(op, dtype):
    """What torch computes for integers (max pools, int64 average pool) is a gap cnnops names;
    what torch rejects, cnnops rejects with the same exception type."""
    x = _int_tensor((2, 3, 6, 6), dtype)
    try:
        POOLS[op](F, x)
        torch_computes = True
    except NotImplementedError:
        torch_computes = False
    assert torch_computes == (op == "max_pool2d" or (op == "avg_pool2d" and dtype == torch.int64)), \
        f"torch changed: {op} on {dtype} (update docs/support.md's pooling table)"
    with pytest.raises(NotImplementedError, match="dtype"):
        POOLS[op](CF, x)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_max_unpool_empty_output_size_with_indices_like_torch(dims):
    """docs/support.md: the empty output, as torch returns it without reading the indices; its backward
    raises as torch's does (a gather at indices outside the empty output)."""
    x = torch.randn((1, 2) + (1,) * dims, requires_grad=True)
    indices = torch.zeros(x.shape, dtype=torch.int64)
    size = [0] + [2] * (dims - 1)  # within one stride (4) of the default size (the kernel, 2)
    torch_fn, cnnops_fn = getattr(F, f"max_unpool{dims}d"), getattr(CF, f"max_unpool{dims}d")
    expected = torch_fn(x, indices, 2, stride=4, output_size=size)
    got = cnnops_fn(x, indices, 2, stride=4, output_size=size)
    assert got.shape == expected.shape and got.numel() == 0
    for out in (expected, got):
        with pytest.raises(RuntimeError):
            out.sum().backward()


NORMS = {
    "batch_norm": lambda M, x: M.batch_norm(x, None, None, training=True),
    "layer_norm": lambda M, x: M.layer_norm(x, (4,)),
    "group_norm": lambda M, x: M.group_norm(x, 1),
    "instance_norm": lambda M, x: M.instance_norm(x),
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
@pytest.mark.parametrize("op", list(NORMS))
def test_norm_integer_and_complex_not_implemented_as_torch(op, dtype):
    x = torch.randn(2, 3, 4, dtype=dtype) if dtype.is_complex else _int_tensor((2, 3, 4), dtype)
    with pytest.raises(NotImplementedError):
        NORMS[op](F, x)
    with pytest.raises(NotImplementedError, match="dtype"):
        NORMS[op](CF, x)


DIFFERENTIABLE = {
    "conv2d": lambda x, M: M.conv2d(x, torch.randn(2, 3, 3, 3, dtype=x.dtype)),
    "max_pool2d": lambda x, M: M.max_pool2d(x, 2),
    "avg_pool2d": lambda x, M: M.avg_pool2d(x, 2),
    "adaptive_avg_pool2d": lambda x, M: M.adaptive_avg_pool2d(x, 2),
    "adaptive_max_pool2d": lambda x, M: M.adaptive_max_pool2d(x, 2),
    "batch_norm": lambda x, M: M.batch_norm(x, None, None, training=True),
    "layer_norm": lambda x, M: M.layer_norm(x, (6,)),
    "group_norm": lambda x, M: M.group_norm(x, 3),
    "instance_norm": lambda x, M: M.instance_norm(x),
}


def _twin(op):
    """The torch.nn.functional twin of DIFFERENTIABLE[op], with the same random weight."""
    def call(module, x):
        torch.manual_seed(0)
        return DIFFERENTIABLE[op](x, module)
    return call


@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_double_backward_like_torch(op):
    """docs/support.md: double backward works on every op family (autograd in the dispatcher)."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    second = []
    for module in (CF, F):
        (g,) = torch.autograd.grad((_twin(op)(module, x) ** 2).sum(), x, create_graph=True)
        assert g.requires_grad
        second.append(torch.autograd.grad((g ** 2).sum(), x)[0])
    torch.testing.assert_close(*second)


@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_forward_mode_ad_like_torch(op):
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    tangents = []
    for module in (CF, F):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(_twin(op)(module, fwAD.make_dual(x, t))).tangent.clone())
    torch.testing.assert_close(*tangents)


@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_torch_func_like_torch(op):
    x = torch.randn(3, 2, 3, 6, 6, dtype=torch.float64)
    per_sample = [torch.func.vmap(torch.func.grad(lambda xi: (_twin(op)(module, xi) ** 2).sum()), randomness="same")(x)
                  for module in (CF, F)]
    torch.testing.assert_close(*per_sample)


def test_cpu_ops_run_under_deterministic_algorithms():
    """Every CPU op runs with torch.use_deterministic_algorithms(True), max unpool included
    (torch's CPU max unpool raises its nondeterminism alert there; cnnops' is deterministic)."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        pooled, indices = CF.max_pool2d(x, 3, 1, 1, return_indices=True)  # overlapping windows
        with pytest.raises(RuntimeError, match="deterministic"):
            F.max_unpool2d(pooled.detach(), indices, 3, 1, 1)
        out = CF.max_unpool2d(pooled, indices, 3, 1, 1)
        out = CF.conv2d(out, torch.randn(4, 3, 3, 3), stride=2)
        out = CF.batch_norm(out, None, None, training=True)
        out = CF.group_norm(CF.avg_pool2d(out, 2), 2)
        CF.adaptive_max_pool2d(CF.layer_norm(out, out.shape[1:]), 1).sum().backward()
        assert x.grad is not None
    finally:
        torch.use_deterministic_algorithms(old)


def test_conv_follows_autocast_like_torch():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert CF.conv2d(x, w).dtype == F.conv2d(x, w).dtype == torch.bfloat16
        # a bfloat16 activation from a layer torch ran under autocast meets a float32 weight
        assert CF.conv2d(x.bfloat16(), w).dtype == F.conv2d(x.bfloat16(), w).dtype


def test_conv_zero_output_channels_rejected_like_torch():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(0, 3, 3, 3)
    with pytest.raises(RuntimeError, match="weight"):
        F.conv2d(x, w)
    with pytest.raises(RuntimeError, match="weight"):
        CF.conv2d(x, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_max_pool_channels_last_window_without_input_taps(dtype):
    """Dilation 3 with kernel 2 and padding 1 on a height of 2: the only window's taps (-1, 2)
    both miss the input, so torch's output is -inf there."""
    x = torch.randn(2, 5, 2, 7, dtype=torch.float64).to(dtype)
    expected, expected_indices = F.max_pool2d(x, (2, 3), (3, 2), (1, 1), (3, 1), True, True)
    assert torch.isneginf(expected).all()
    out, indices = CF.max_pool2d(x.contiguous(memory_format=torch.channels_last), (2, 3), (3, 2), (1, 1), (3, 1),
                                 True, True)
    assert torch.equal(out, expected)
    assert torch.equal(indices, expected_indices)


def _grad_input(fn, x, grad_output):
    x = x.detach().requires_grad_()
    fn(x).backward(grad_output)
    return x.grad


@pytest.mark.parametrize("case", ["batch_norm_nhwc_permuted_height_1", "batch_norm_nhwc_permuted_width_1",
                                  "instance_norm_batch_1_channels_last_grad"])
def test_gradients_where_torch_cpu_depends_on_strides(case):
    """torch 2.x's CPU kernels return wrong input gradients for these stride patterns (their
    result differs from the same call on contiguous copies); cnnops must give the contiguous
    result. The expected values are torch's, computed on contiguous tensors."""
    torch.manual_seed(0)
    if case.startswith("batch_norm"):
        shape = (3, 3, 1, 4) if "height" in case else (3, 3, 4, 1)
        fn = {"torch": lambda x: F.batch_norm(x, None, None, training=True),
              "cnnops": lambda x: CF.batch_norm(x, None, None, training=True)}
        x = torch.randn(shape, dtype=torch.float64)
        # an (N, H, W, C) tensor permuted to (N, C, H, W): channels last with a size-1 dim
        # whose stride is not the canonical one
        strided_x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        grad_output = torch.randn(shape, dtype=torch.float64)
        strided_grad = grad_output
    else:
        fn = {"torch": F.instance_norm, "cnnops": CF.instance_norm}
        x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
        strided_x = x.contiguous(memory_format=torch.channels_last)
        grad_output = torch.randn(1, 3, 4, 4, dtype=torch.float64)
        strided_grad = grad_output.contiguous(memory_format=torch.channels_last)
    expected = _grad_input(fn["torch"], x, grad_output)
    torch.testing.assert_close(_grad_input(fn["cnnops"], strided_x, strided_grad), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_running_stats_requiring_grad_rejected_like_torch(op):
    p = torch.rand(3, requires_grad=True)
    x = torch.randn(4, 3, 5)
    call = {"batch_norm": lambda M, rm, rv: M.batch_norm(x, rm, rv, training=True),
            "instance_norm": lambda M, rm, rv: M.instance_norm(x, rm, rv)}[op]
    with pytest.raises(RuntimeError, match="running_mean"):
        call(F, p * 0, p * 0 + 1)
    with pytest.raises(RuntimeError, match="running_mean"):
        call(CF, p * 0, p * 0 + 1)


def test_torch_side_of_the_known_bugs():
    """The strict-xfail tests above fail as long as cnnops differs; this checks, outside any
    xfail, that torch still behaves as they expect, so none of them can fail for a torch-side
    reason."""
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.conv2d(x, w).dtype == torch.bfloat16 and F.conv2d(x.bfloat16(), w).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="weight"):
        F.conv2d(torch.randn(2, 3, 5, 5), torch.randn(0, 3, 3, 3))
    for dtype in (torch.float64, torch.bfloat16):
        out, _ = F.max_pool2d(torch.randn(2, 5, 2, 7).to(dtype), (2, 3), (3, 2), (1, 1), (3, 1), True, True)
        assert torch.isneginf(out).all()
    p = torch.rand(3, requires_grad=True)
    for call in (lambda: F.batch_norm(torch.randn(4, 3, 5), p * 0, p * 0 + 1, training=True),
                 lambda: F.instance_norm(torch.randn(4, 3, 5), p * 0, p * 0 + 1)):
        with pytest.raises(RuntimeError, match="running_mean"):
            call()
