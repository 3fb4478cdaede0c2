"""Build cnnops._C: CPU kernels always, CUDA kernels by default only where they can run (torch is
a CUDA build, nvcc exists and a GPU is visible).

CNNOPS_CUDA=1 compiles CUDA without a GPU (CI does, to prove the CUDA sources compile) and makes
a missing CUDA toolchain an error; CNNOPS_CUDA=0 turns CUDA off.
DEBUG=1 builds with -O0 -g for gdb. TORCH_CUDA_ARCH_LIST overrides the GPU architectures.
CNNOPS_NO_EXTENSION=1 builds nothing: `make install` uses it for the editable install, which
pip builds in a fresh temporary folder each time, and then compiles with
`setup.py build_ext --inplace`, incrementally in the persistent build/ folder.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The real toolkit folder. /usr/local/bin/nvcc here is a wrapper script, from which
    torch would guess CUDA_HOME=/usr/local (then -lcudart fails), so look for bin/nvcc."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return os.path.realpath(candidate)
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):  # a wrapper script: find the nvcc it execs
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc") and os.path.isfile(token):
                    real = os.path.realpath(token)
                    break
        return os.path.dirname(os.path.dirname(real))
    return None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension loads

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_wanted(setting, toolchain, gpu_visible):
    """CNNOPS_CUDA=1 forces the CUDA kernels (CI: the sources must compile without a GPU), 0 turns
    them off; unset, they are compiled only where a GPU is visible (nvcc's minutes buy nothing
    elsewhere). gpu_visible is called only then. tests/test_build.py checks this table."""
    setting = (setting or "auto").lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return bool(toolchain and gpu_visible())


debug = os.environ.get("DEBUG", "0") == "1"
cuda_possible = torch.version.cuda is not None and cuda_home is not None
use_cuda = cuda_wanted(os.environ.get("CNNOPS_CUDA"), cuda_possible, torch.cuda.is_available)
if use_cuda and not cuda_possible:
    sys.exit(f"CNNOPS_CUDA=1 but no CUDA toolchain: torch.version.cuda={torch.version.cuda}, "
             f"CUDA_HOME={cuda_home}")


def nvidia_pip_includes():
    """cublas_v2.h and cusparse.h, which torch's CUDAContext.h includes, live in the pip
    package `nvidia` rather than in the minimal toolkit here."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in list(nvidia.__path__):
        found += [p for p in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(p)]
    return sorted(found)


if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

opt = ["-O0", "-g"] if debug else ["-O3"]
# C++20 (std::make_unique_for_overwrite, ...) explicitly: torch.utils.cpp_extension adds its own
# -std only when none is given: c++17 on torch 2.11, c++20 on 2.14.
std = ["-std=c++20"]
# fp-contract: let the GEMM micro-kernel fuse a*b+c into FMA (ISO -std=c++NN turns it off).
# -fopenmp: at::parallel_for is a header template that runs serially unless the extension
# itself is compiled with OpenMP.
# -Wno-psabi: GCC notes that a vector argument's ABI depends on the ISA; the SIMD kernels' vectors
# only cross always-inlined calls (simd.h), so no call of ours has one in its ABI.
cxx_flags = opt + std + ["-ffp-contract=fast", "-fopenmp", "-Wno-psabi"]
sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/autocast/*.cpp")
                                    + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/python/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
extra = {"cxx": cxx_flags}
Extension = CppExtension
if use_cuda:
    Extension = CUDAExtension
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += nvidia_pip_includes()
    extra["nvcc"] = opt + std + ["--expt-relaxed-constexpr", "-lineinfo"] + (["-G"] if debug else [])
    cxx_flags.append("-DCNNOPS_WITH_CUDA")

setup(
    packages=find_packages(include=["cnnops", "cnnops.*"]),
    ext_modules=[] if os.environ.get("CNNOPS_NO_EXTENSION") == "1" else [
        Extension("cnnops._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                  extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
