"""The build itself: version, CUDA kernels present when they were asked for, the ISA dispatch."""
import ast
import glob
import inspect
import os
import re

import pytest
import torch

import cnnops
import cnnops.nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_version():
    assert isinstance(cnnops.__version__, str) and cnnops.__version__.count(".") == 2


def test_cuda_kernels_compiled_when_forced():
    """CI builds with CNNOPS_CUDA=1: the CUDA kernels must then really be registered."""
    forced = os.environ.get("CNNOPS_CUDA") == "1"
    if forced:
        assert cnnops.has_cuda()
    assert cnnops.has_cuda() == torch._C._dispatch_has_kernel_for_dispatch_key("cnnops::conv_backward", "CUDA")


def _setup_function(name):
    """One function of setup.py, compiled alone (running setup.py would build)."""
    tree = ast.parse(_read("setup.py"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


def test_cuda_compiled_by_default_only_where_a_gpu_is_visible():
    cuda_wanted = _setup_function("cuda_wanted")
    asked = []

    def gpu(visible):
        def check():
            asked.append(visible)
            return visible
        return check

    for unset in (None, "", "auto", "AUTO"):
        assert cuda_wanted(unset, True, gpu(True)) is True
        assert cuda_wanted(unset, True, gpu(False)) is False  # a CUDA torch and nvcc, no GPU
        assert cuda_wanted(unset, False, gpu(True)) is False  # no toolchain
    for on in ("1", "true", "yes", "on", "ON"):
        assert cuda_wanted(on, True, gpu(False)) is True  # CI: compiled without a GPU
        assert cuda_wanted(on, False, gpu(False)) is True  # setup.py then exits: no toolchain
    for off in ("0", "false", "no", "off", "Off"):
        assert cuda_wanted(off, True, gpu(True)) is False
    assert asked == [True, False] * 4, "the GPU is looked for only when CNNOPS_CUDA is unset and CUDA can build"


def test_ci_forces_the_cuda_build():
    """Without a GPU the default build skips CUDA, so CI must force it: every submission proves
    that the CUDA sources compile."""
    assert re.search(r"^export CNNOPS_CUDA=1$", _read(".ci/run"), re.M)


def test_make_test_lints_before_the_tests():
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", _read("Makefile"), re.M)
    assert recipe, "no test target in the Makefile"
    lines = recipe.group(1).splitlines()
    ruff = [i for i, line in enumerate(lines) if "ruff check" in line]
    pytest_ = [i for i, line in enumerate(lines) if "pytest" in line]
    assert ruff and pytest_ and ruff[0] < pytest_[0], lines


def test_every_op_has_cpu_and_fake_kernels():
    for op in ("conv_forward", "conv_backward"):
        name = f"cnnops::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")


# --------------------------------------------------------------------------------------------
# the supported torch range (pyproject.toml, Makefile; .ci/run builds and tests its oldest)

def _declared_torch_specs():
    pyproject = _read("pyproject.toml")
    makefile = _read("Makefile")
    return (re.findall(r'"(torch[<>=!~][^"]*)"', pyproject),
            re.findall(r"^TORCH_SPEC := (\S+)", makefile, re.M))


def test_one_torch_range_declared_everywhere():
    in_pyproject, in_makefile = _declared_torch_specs()
    assert len(in_pyproject) == 2 and len(set(in_pyproject)) == 1, in_pyproject  # build and run
    assert in_makefile == in_pyproject[:1], (in_makefile, in_pyproject)
    lower = re.search(r">=([0-9.]+)", in_pyproject[0])
    assert lower and lower.group(1) == "2.11", "the GPU machine's torch (2.11) must be the oldest supported"


def test_installed_torch_is_inside_the_declared_range():
    spec = _declared_torch_specs()[0][0]
    version = torch.torch_version.TorchVersion(torch.__version__.split("+")[0])
    for op, bound in re.findall(r"(>=|<=|<|>|==)([0-9.]+)", spec):
        assert {">=": version >= bound, "<=": version <= bound, "<": version < bound,
                ">": version > bound, "==": version == bound}[op], f"torch {torch.__version__} outside {spec}"


def test_cxx20_given_explicitly_to_every_compiler():
    """torch 2.11's cpp_extension adds -std=c++17 unless a -std is given; the sources need
    C++20. Checked in the ninja files of this tree's builds (the build itself fails without)."""
    ninja_files = glob.glob(os.path.join(ROOT, "build", "temp.*", "build.ninja"))
    if not ninja_files:
        pytest.skip("no build/temp.*/build.ninja (built elsewhere)")
    for path in ninja_files:
        flags = [line for line in open(path) if re.match(r"(cflags|post_cflags|cuda_cflags|cuda_post_cflags) =", line)]
        assert flags, path
        for line in flags:
            assert "-std=c++17" not in line, f"{path}: {line.strip()}"
            if line.startswith(("post_cflags", "cuda_post_cflags")):
                assert "-std=c++20" in line, f"{path}: {line.strip()}"


def test_sync_batchnorm_on_this_torch():
    """cnnops.nn.SyncBatchNorm constructs and converts on the installed torch: on 2.11,
    _BatchNorm.__init__ has no `bias` argument (TypeError if passed), later versions do."""
    has_bias = "bias" in inspect.signature(torch.nn.modules.batchnorm._BatchNorm.__init__).parameters
    assert inspect.signature(cnnops.nn.SyncBatchNorm) == inspect.signature(torch.nn.SyncBatchNorm)
    bn = cnnops.nn.SyncBatchNorm(4)
    assert bn.weight.shape == (4,) and bn.bias.shape == (4,) and bn.process_group is None
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    converted = cnnops.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert type(converted[1]) is cnnops.nn.SyncBatchNorm and converted[1].weight is model[1].weight
    if has_bias:
        no_bias = cnnops.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(4, bias=False))
        assert no_bias.bias is None and no_bias.weight is not None
    else:
        with pytest.raises(TypeError, match="bias"):
            torch.nn.SyncBatchNorm(4, bias=False)
        with pytest.raises(TypeError, match="bias"):
            cnnops.nn.SyncBatchNorm(4, bias=False)
