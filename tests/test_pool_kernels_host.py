"""The CUDA pooling kernels (csrc/cuda/pool_kernels.cuh), run on the CPU.

The kernel header is plain C++ apart from the CUDA launch vocabulary, so here it is compiled for
the host with a small shim: __global__/__device__ vanish, threadIdx/blockIdx/blockDim/gridDim are
globals, and a "launch" calls the kernel once per (block, thread) of a small grid whose block
size does not divide the work (the grid-stride loop then wraps and has ragged tails). The
wrappers below set up the arguments the way csrc/cuda/pool.cu does (geometry from
csrc/common/pool_checks.h, inputs made contiguous in their suggested memory format, int32 or
int64 offsets), and every result is compared with torch's CPU operators. So the NCDHW and NDHWC
index math, the window and gather math and the unpool index checks that the GPU runs are tested
on every CI run, with or without a GPU.
"""
import hashlib
import os
import tempfile
import zlib

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = r"""
#include <torch/extension.h>
#include "common/pool_checks.h"

// ---- shim: the CUDA launch vocabulary on the host ------------------------------------------
struct EmulatedDim3 { unsigned x = 1, y = 1, z = 1; };
static EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
static unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  if (value < old) *address = value;
  return old;
}
#include "cuda/pool_kernels.cuh"

using namespace cnnops;

// Runs kernel(args...) once per thread of a grid of at most 3 blocks of 37 threads, serially.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t total, Args... args) {
  const int64_t threads = 37;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(3, (total + threads - 1) / threads));
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = static_cast<unsigned>(threads);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t t = 0; t < threads; ++t) {
      blockIdx.x = static_cast<unsigned>(b);
      threadIdx.x = static_cast<unsigned>(t);
      kernel(args...);
    }
}

template <typename F>
void with_variant(bool int32, bool channels_last, const F& f) {
  if (int32) {
    if (channels_last) f(int32_t{}, std::true_type{}); else f(int32_t{}, std::false_type{});
  } else {
    if (channels_last) f(int64_t{}, std::true_type{}); else f(int64_t{}, std::false_type{});
  }
}

#define DISPATCH(t, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "emulated", __VA_ARGS__)

std::vector<at::Tensor> max_pool_fwd(at::Tensor input_, std::vector<int64_t> k, std::vector<int64_t> s,
                                     std::vector<int64_t> p, std::vector<int64_t> d, bool ceil_mode, bool int32) {
  const PoolGeometry g = make_pool_geometry("max_pool_forward", PoolKind::kMax, input_, k, s, p, d, ceil_mode);
  const auto fmt = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(fmt);
  const auto shape = pool_output_shape(g, k.size());
  at::Tensor out = at::empty(shape, input.options().memory_format(fmt));
  at::Tensor idx = at::empty(shape, input.options().dtype(at::kLong).memory_format(fmt));
  const int64_t total = out.numel();
  DISPATCH(input.scalar_type(), [&] {
    with_variant(int32, is_channels_last(fmt), [&](auto it, auto cl) {
      using index_t = decltype(it);
      launch(&max_pool_forward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
             input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>(),
             g, static_cast<index_t>(total));
    });
  });
  return {out, idx};
}

at::Tensor max_pool_bwd(at::Tensor grad_output_, at::Tensor input, at::Tensor indices_, std::vector<int64_t> k,
                        std::vector<int64_t> s, std::vector<int64_t> p, std::vector<int64_t> d, bool ceil_mode,
                        bool int32) {
  const PoolGeometry g = make_pool_geometry("max_pool_backward", PoolKind::kMax, input, k, s, p, d, ceil_mode);
  check_pool_grad_output("max_pool_backward", grad_output_, input, g, k.size());
  const auto fmt = pool_memory_format(input);
  const at::Tensor grad_output = grad_output_.contiguous(fmt), indices = indices_.contiguous(fmt);
  at::Tensor grad_input = at::empty(input.sizes(), grad_output.options().memory_format(fmt));
  const int64_t total = grad_input.numel();
  DISPATCH(input.scalar_type(), [&] {
    with_variant(int32, is_channels_last(fmt), [&](auto it, auto cl) {
      using index_t = decltype(it);
      launch(&max_pool_backward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
             grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
             grad_input.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total));
    });
  });
  return grad_input;
}

at::Tensor avg_pool_fwd(at::Tensor input_, std::vector<int64_t> k, std::vector<int64_t> s, std::vector<int64_t> p,
                        bool ceil_mode, bool count_include_pad, int64_t divisor_override, bool int32) {
  const PoolGeometry g = make_pool_geometry("avg_pool_forward", PoolKind::kAvg, input_, k, s, p,
                                            std::vector<int64_t>(k.size(), 1), ceil_mode);
  const auto fmt = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(fmt);
  at::Tensor out = at::empty(pool_output_shape(g, k.size()), input.options().memory_format(fmt));
  const int64_t total = out.numel();
  DISPATCH(input.scalar_type(), [&] {
    with_variant(int32, is_channels_last(fmt), [&](auto it, auto cl) {
      using index_t = decltype(it);
      launch(&avg_pool_forward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
             input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, count_include_pad,
             divisor_override, static_cast<index_t>(total));
    });
  });
  return out;
}

at::Tensor avg_pool_bwd(at::Tensor grad_output_, at::Tensor input, std::vector<int64_t> k, std::vector<int64_t> s,
                        std::vector<int64_t> p, bool ceil_mode, bool count_include_pad, int64_t divisor_override,
                        bool int32) {
  const PoolGeometry g = make_pool_geometry("avg_pool_backward", PoolKind::kAvg, input, k, s, p,
                                            std::vector<int64_t>(k.size(), 1), ceil_mode);
  check_pool_grad_output("avg_pool_backward", grad_output_, input, g, k.size());
  const auto fmt = pool_memory_format(input);
  const at::Tensor grad_output = grad_output_.contiguous(fmt);
  at::Tensor grad_input = at::empty(input.sizes(), grad_output.options().memory_format(fmt));
  const int64_t total = grad_input.numel();
  DISPATCH(input.scalar_type(), [&] {
    with_variant(int32, is_channels_last(fmt), [&](auto it, auto cl) {
      using index_t = decltype(it);
      launch(&avg_pool_backward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
             grad_output.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), g,
             count_include_pad, divisor_override, static_cast<index_t>(total));
    });
  });
  return grad_input;
}

// chunks > 1: the two-pass (split window) average kernels.
std::vector<at::Tensor> adaptive_fwd(at::Tensor input_, std::vector<int64_t> output_size, bool is_max, bool int32,
                                     int64_t chunks) {
  const PoolGeometry g = make_adaptive_pool_geometry("adaptive_pool_forward", input_, output_size);
  const auto fmt = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(fmt);
  const auto shape = pool_output_shape(g, output_size.size());
  at::Tensor out = at::empty(shape, input.options().memory_format(fmt));
  at::Tensor idx = at::empty(shape, input.options().dtype(at::kLong).memory_format(fmt));
  const int64_t total = out.numel();
  DISPATCH(input.scalar_type(), [&] {
    with_variant(int32, is_channels_last(fmt), [&](auto it, auto cl) {
      using index_t = decltype(it);
      if (is_max)
        launch(&adaptive_max_pool_forward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
               input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>(),
               g, static_cast<index_t>(total));
      else if (chunks == 1)
        launch(&adaptive_avg_pool_forward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
               input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total));
      else {
        using acc_t = at::acc_type<scalar_t, true>;
        at::Tensor partial = at::full({total * chunks}, std::nan(""),
                                      input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        launch(&adaptive_avg_pool_partial_kernel<scalar_t, index_t, decltype(cl)::value>, total * chunks,
               input.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), g,
               static_cast<index_t>(chunks), static_cast<index_t>(total * chunks));
        launch(&adaptive_avg_pool_finish_kernel<scalar_t, index_t, decltype(cl)::value>, total,
               partial.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), g,
               static_cast<index_t>(chunks), static_cast<index_t>(total));
      }
    });
  });
  return {out, idx};
}

at::Tensor adaptive_bwd(at::Tensor grad_output_, at::Tensor input, at::Tensor indices_, bool is_max, bool int32) {
  const PoolGeometry g = make_adaptive_pool_geometry("adaptive_pool_backward", input, grad_output_.sizes().slice(2));
  check_pool_grad_output("adaptive_pool_backward", grad_output_, input, g, input.dim() - 2);
  const auto fmt = pool_memory_format(input);
  const at::Tensor grad_output = grad_output_.contiguous(fmt);
  const at::Tensor indices = is_max ? indices_.contiguous(fmt) : indices_;
  at::Tensor grad_input = at::empty(input.sizes(), grad_output.options().memory_format(fmt));
  const int64_t total = grad_input.numel();
  DISPATCH(input.scalar_type(), [&] {
    with_variant(int32, is_channels_last(fmt), [&](auto it, auto cl) {
      using index_t = decltype(it);
      if (is_max)
        launch(&adaptive_max_pool_backward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
               grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
               grad_input.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total));
      else
        launch(&adaptive_avg_pool_backward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
               grad_output.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), g,
               static_cast<index_t>(total));
    });
  });
  return grad_input;
}

// Returns (output, first invalid position or -1). The output gets a guard band of NaNs on both
// sides, so a write outside it would show up as a changed guard value.
std::vector<at::Tensor> unpool_fwd(at::Tensor input_, at::Tensor indices_, std::vector<int64_t> output_size,
                                   bool int32) {
  const auto fmt = pool_memory_format(input_);
  const at::Tensor input = input_.contiguous(fmt), indices = indices_.contiguous(fmt);
  std::vector<int64_t> shape{input.size(0), input.size(1)};
  shape.insert(shape.end(), output_size.begin(), output_size.end());
  at::Tensor out = at::empty(shape, input.options().memory_format(fmt));  // at::zeros would drop the format
  int64_t out_plane = 1;
  for (int64_t v : output_size) out_plane *= v;
  const int64_t total = input.numel(), guard = 64;
  at::Tensor buffer = at::full({out.numel() + 2 * guard}, std::nan(""), input.options());
  unsigned long long first_invalid = std::numeric_limits<unsigned long long>::max();
  DISPATCH(input.scalar_type(), [&] {
    scalar_t* inner = buffer.mutable_data_ptr<scalar_t>() + guard;
    for (int64_t i = 0; i < out.numel(); ++i) inner[i] = scalar_t(0);
    with_variant(int32, is_channels_last(fmt), [&](auto it, auto cl) {
      using index_t = decltype(it);
      const UnpoolSizes<index_t> s{static_cast<index_t>(input.size(1)),
                                   static_cast<index_t>(total / (input.size(0) * input.size(1))),
                                   static_cast<index_t>(out_plane)};
      launch(&max_unpool_forward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
             input.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(), inner, s,
             static_cast<index_t>(total), &first_invalid);
    });
    // copy the inner part back in memory order
    at::Tensor flat = buffer.narrow(0, guard, out.numel());
    out.as_strided({out.numel()}, {1}).copy_(flat);
  });
  const bool any = first_invalid != std::numeric_limits<unsigned long long>::max();
  at::Tensor pos = at::full({1}, any ? static_cast<int64_t>(first_invalid) : -1, at::kLong);
  at::Tensor guards = at::cat({buffer.narrow(0, 0, guard), buffer.narrow(0, guard + out.numel(), guard)});
  return {out, pos, guards};
}

std::vector<at::Tensor> unpool_bwd(at::Tensor grad_output_, at::Tensor input, at::Tensor indices_, bool int32) {
  const auto fmt = pool_memory_format(input);
  const at::Tensor grad_output = grad_output_.contiguous(fmt), indices = indices_.contiguous(fmt);
  at::Tensor grad_input = at::empty(input.sizes(), grad_output.options().memory_format(fmt));
  const int64_t total = grad_input.numel();
  const int64_t planes = input.size(0) * input.size(1);
  unsigned long long first_invalid = std::numeric_limits<unsigned long long>::max();
  DISPATCH(input.scalar_type(), [&] {
    with_variant(int32, is_channels_last(fmt), [&](auto it, auto cl) {
      using index_t = decltype(it);
      const UnpoolSizes<index_t> s{static_cast<index_t>(input.size(1)), static_cast<index_t>(total / planes),
                                   static_cast<index_t>(grad_output.numel() / planes)};
      launch(&max_unpool_backward_kernel<scalar_t, index_t, decltype(cl)::value>, total,
             grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
             grad_input.mutable_data_ptr<scalar_t>(), s, static_cast<index_t>(total), &first_invalid);
    });
  });
  const bool any = first_invalid != std::numeric_limits<unsigned long long>::max();
  return {grad_input, at::full({1}, any ? static_cast<int64_t>(first_invalid) : -1, at::kLong)};
}
"""

HEADERS = ["cuda/pool_kernels.cuh", "common/pool_shape.h", "common/pool_checks.h", "common/macros.h"]
FUNCTIONS = ["max_pool_fwd", "max_pool_bwd", "avg_pool_fwd", "avg_pool_bwd", "adaptive_fwd", "adaptive_bwd",
             "unpool_fwd", "unpool_bwd"]


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load_inline

    # A build folder per checkout, kept between runs (load_inline rebuilds when SOURCE changes).
    build = os.path.join(tempfile.gettempdir(), f"cnnops_pool_kernels_host_{zlib.crc32(ROOT.encode()):08x}")
    os.makedirs(build, exist_ok=True)
    # load_inline rebuilds when its source text changes, not when a header does: name the
    # headers' digest in the source.
    digest = hashlib.sha1()
    for header in HEADERS:
        with open(os.path.join(ROOT, "csrc", header), "rb") as f:
            digest.update(f.read())
    return load_inline(
        name="cnnops_pool_kernels_host",
        cpp_sources=SOURCE + f"\n// headers {digest.hexdigest()}\n",
        functions=FUNCTIONS,
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O1"],
        build_directory=build,
        verbose=False,
    )


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def make_input(shape, dtype, layout, kind="randn"):
    if kind == "ties":  # few distinct values: many tied maxima, so the tie rule is exercised
        x = torch.randint(-2, 3, shape).to(dtype)
    else:
        x = torch.randn(shape).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CHANNELS_LAST[len(shape)])
    return x


def memory_order(t):
    """The elements of a dense tensor in memory order (a writable view)."""
    return t.as_strided((t.numel(),), (1,))


def expect_layout(t, x, layout):
    if layout == "channels_last" and t.dim() in CHANNELS_LAST:
        assert t.is_contiguous(memory_format=CHANNELS_LAST[t.dim()]), t.stride()


TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


def close(actual, expected, dtype, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], equal_nan=True, msg=msg)


# dims, N, C, size, kernel, stride, padding, dilation, ceil_mode
MAX_CASES = [
    (1, 2, 3, (11,), (3,), (2,), (1,), (1,), False),
    (1, 1, 2, (10,), (4,), (3,), (2,), (2,), True),      # dilated, last window starts in padding
    (2, 2, 3, (7, 8), (3, 3), (2, 2), (1, 1), (1, 1), False),
    (2, 2, 3, (6, 6), (3, 3), (2, 2), (1, 1), (1, 1), True),  # ResNet stem-like, ceil drops a window
    (2, 1, 4, (9, 7), (2, 3), (2, 1), (1, 0), (2, 1), True),
    (2, 2, 5, (5, 5), (2, 2), (3, 3), (0, 0), (1, 1), True),  # ceil window partly outside, no pad
    (3, 1, 3, (5, 6, 7), (2, 3, 2), (2, 2, 1), (1, 1, 0), (1, 1, 2), False),
    (3, 2, 2, (4, 5, 5), (3, 2, 2), (2, 2, 2), (1, 1, 1), (1, 2, 1), True),
]


def case_id(c):
    return f"{c[0]}d-in{c[3]}-k{c[4]}-s{c[5]}-p{c[6]}-d{c[7]}-ceil{int(c[8])}"


@pytest.mark.parametrize("case", MAX_CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("int32", [True, False], ids=["i32", "i64"])
def test_max_pool_kernels(emu, case, layout, dtype, int32):
    dims, n, c, size, k, s, p, d, ceil_mode = case
    if layout == "channels_last" and dims == 1:
        pytest.skip("no channels_last for 3-D tensors")
    pool = getattr(F, f"max_pool{dims}d")
    for kind in ("randn", "ties", "nan"):
        x = make_input((n, c) + size, dtype, layout, "ties" if kind == "ties" else "randn")
        if kind == "nan":
            memory_order(x)[::7] = float("nan")
            memory_order(x)[3::11] = float("-inf")
        xr = x.detach().clone().requires_grad_()
        ref, ref_idx = pool(xr, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
        out, idx = emu.max_pool_fwd(x, list(k), list(s), list(p), list(d), ceil_mode, int32)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True, msg=f"{kind}: output")
        assert torch.equal(idx, ref_idx), f"{kind}: indices differ\n{idx}\n{ref_idx}"
        expect_layout(out, x, layout)
        if kind == "nan":
            continue
        dy = make_input(ref.shape, dtype, layout)
        (ref_dx,) = torch.autograd.grad(ref, xr, dy)
        dx = emu.max_pool_bwd(dy, x, idx, list(k), list(s), list(p), list(d), ceil_mode, int32)
        close(dx, ref_dx, dtype, f"{kind}: grad_input")
        expect_layout(dx, x, layout)


# dims, N, C, size, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
AVG_CASES = [
    (1, 2, 3, (11,), (3,), (2,), (1,), False, True, 0),
    (1, 1, 2, (10,), (4,), (3,), (2,), True, False, 0),
    (1, 1, 2, (10,), (4,), (3,), (2,), True, True, 0),     # ceil window past the padded input
    (2, 2, 3, (7, 8), (3, 3), (2, 2), (1, 1), False, True, 0),
    (2, 2, 3, (6, 7), (3, 2), (2, 3), (1, 1), True, True, 0),
    (2, 2, 3, (6, 7), (3, 2), (2, 3), (1, 1), True, False, 0),
    (2, 1, 4, (5, 5), (2, 2), (2, 2), (0, 0), False, True, 3),
    (2, 2, 2, (8, 8), (2, 2), (1, 1), (1, 0), True, False, 0),  # overlapping, stride 1
    (3, 1, 3, (5, 6, 7), (2, 3, 2), (2, 2, 1), (1, 1, 0), True, True, 0),
    (3, 2, 2, (4, 5, 5), (3, 2, 2), (2, 2, 2), (1, 1, 1), True, False, 0),
    (3, 1, 2, (4, 4, 4), (2, 2, 2), (1, 2, 1), (0, 1, 1), False, True, 5),
    (2, 1, 3, (7, 6), (2, 3), (2, 2), (1, 1), True, True, -3),    # torch takes negative divisors
]


def avg_ref(x, dims, k, s, p, ceil_mode, cip, div):
    if dims == 1:  # avg_pool1d has no divisor_override: run it as a 2d pool over (1, W)
        y = F.avg_pool2d(x.unsqueeze(2), (1,) + k, (1,) + s, (0,) + p, ceil_mode, cip, div or None)
        return y.squeeze(2)
    return getattr(F, f"avg_pool{dims}d")(x, k, s, p, ceil_mode, cip, div or None)


def _avg_case_id(c):
    return f"{c[0]}d-in{c[3]}-k{c[4]}-s{c[5]}-p{c[6]}-ceil{int(c[7])}-cip{int(c[8])}-div{c[9]}"


@pytest.mark.parametrize("case", AVG_CASES, ids=_avg_case_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("int32", [True, False], ids=["i32", "i64"])
def test_avg_pool_kernels(emu, case, layout, dtype, int32):
    dims, n, c, size, k, s, p, ceil_mode, cip, div = case
    if layout == "channels_last" and dims == 1:
        pytest.skip("no channels_last for 3-D tensors")
    x = make_input((n, c) + size, dtype, layout)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xr = x.detach().to(ref_dtype).requires_grad_()
    ref = avg_ref(xr, dims, k, s, p, ceil_mode, cip, div)
    out = emu.avg_pool_fwd(x, list(k), list(s), list(p), ceil_mode, cip, div, int32)
    close(out, ref.to(dtype), dtype, "output")
    expect_layout(out, x, layout)
    dy = make_input(ref.shape, dtype, layout)
    (ref_dx,) = torch.autograd.grad(ref, xr, dy.to(ref_dtype))
    dx = emu.avg_pool_bwd(dy, x, list(k), list(s), list(p), ceil_mode, cip, div, int32)
    close(dx, ref_dx.to(dtype), dtype, "grad_input")
    expect_layout(dx, x, layout)


ADAPTIVE_CASES = [  # dims, N, C, size, output_size
    (1, 2, 3, (11,), (4,)),
    (1, 1, 2, (5,), (7,)),          # output larger than input: overlapping windows
    (2, 2, 3, (7, 9), (3, 4)),
    (2, 1, 2, (5, 5), (1, 1)),      # global
    (2, 2, 3, (16, 20), (1, 1)),    # global, a window large enough for the split kernels on CUDA
    (2, 2, 2, (4, 6), (6, 5)),
    (2, 2, 2, (4, 6), (0, 3)),      # empty output: zero gradient
    (3, 1, 3, (5, 6, 7), (2, 3, 4)),
    (3, 2, 2, (3, 4, 5), (4, 3, 7)),
]


@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=lambda c: f"{c[0]}d-in{c[3]}-out{c[4]}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("int32", [True, False], ids=["i32", "i64"])
def test_adaptive_pool_kernels(emu, case, layout, dtype, int32):
    dims, n, c, size, osize = case
    if layout == "channels_last" and dims == 1:
        pytest.skip("no channels_last for 3-D tensors")
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # average
    x = make_input((n, c) + size, dtype, layout)
    xr = x.detach().to(ref_dtype).requires_grad_()
    ref = getattr(F, f"adaptive_avg_pool{dims}d")(xr, osize)
    for chunks in (1, 3, 7):
        out, _ = emu.adaptive_fwd(x, list(osize), False, int32, chunks)
        close(out, ref.to(dtype), dtype, f"avg output, {chunks} chunks")
        expect_layout(out, x, layout)
    if 0 in osize:  # torch's backward rejects an empty grad_output; no window means no gradient
        dx = emu.adaptive_bwd(torch.empty(ref.shape, dtype=dtype), x, torch.empty(0, dtype=torch.long), False, int32)
        assert torch.equal(dx, torch.zeros_like(x))
        return
    dy = make_input(ref.shape, dtype, layout)
    (ref_dx,) = torch.autograd.grad(ref, xr, dy.to(ref_dtype))
    dx = emu.adaptive_bwd(dy, x, torch.empty(0, dtype=torch.long), False, int32)
    close(dx, ref_dx.to(dtype), dtype, "avg grad_input")
    # max, with ties and NaNs
    for kind in ("ties", "nan"):
        x = make_input((n, c) + size, dtype, layout, "ties")
        if kind == "nan":
            memory_order(x)[1::5] = float("nan")
        xr = x.detach().clone().requires_grad_()
        ref, ref_idx = getattr(F, f"adaptive_max_pool{dims}d")(xr, osize, return_indices=True)
        out, idx = emu.adaptive_fwd(x, list(osize), True, int32, 1)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True, msg=f"{kind}: max output")
        assert torch.equal(idx, ref_idx), f"{kind}: indices differ\n{idx}\n{ref_idx}"
        if kind == "nan":
            continue
        dy = make_input(ref.shape, dtype, layout)
        (ref_dx,) = torch.autograd.grad(ref, xr, dy)
        dx = emu.adaptive_bwd(dy, x, idx, True, int32)
        close(dx, ref_dx, dtype, "max grad_input")
        expect_layout(dx, x, layout)


UNPOOL_CASES = [  # dims, N, C, size, kernel (= stride), output_size
    (1, 2, 3, (4,), (2,), (9,)),
    (2, 2, 3, (3, 4), (2, 2), (6, 8)),
    (2, 1, 4, (3, 3), (3, 2), (10, 7)),
    (3, 1, 2, (2, 3, 2), (2, 2, 2), (5, 6, 4)),
]


@pytest.mark.parametrize("case", UNPOOL_CASES, ids=lambda c: f"{c[0]}d-in{c[3]}-out{c[5]}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("int32", [True, False], ids=["i32", "i64"])
def test_max_unpool_kernels(emu, case, layout, dtype, int32):
    dims, n, c, size, k, osize = case
    if layout == "channels_last" and dims == 1:
        pytest.skip("no channels_last for 3-D tensors")
    # distinct indices within each plane: a max pool with stride = kernel over the output size
    src = make_input((n, c) + osize, dtype, layout)
    _, idx = getattr(F, f"max_pool{dims}d")(src, k, k, return_indices=True)
    idx = idx[(slice(None), slice(None)) + tuple(slice(0, v) for v in size)]
    x = make_input(idx.shape, dtype, layout)
    idx = idx.contiguous(memory_format=CHANNELS_LAST[idx.dim()]) if layout == "channels_last" else idx.contiguous()
    ref = getattr(F, f"max_unpool{dims}d")(x, idx, k, k, output_size=osize)
    out, pos, guards = emu.unpool_fwd(x, idx, list(osize), int32)
    assert pos.item() == -1
    assert torch.equal(out, ref)
    expect_layout(out, x, layout)
    dy = make_input(ref.shape, dtype, layout)
    ref_dx = dy.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    dx, pos = emu.unpool_bwd(dy, x, idx, int32)
    assert pos.item() == -1
    assert torch.equal(dx, ref_dx)
    expect_layout(dx, x, layout)

    # Out-of-range indices: never written or read, and the first offending position (in the
    # memory order of the indices) is reported.
    plane = 1
    for v in osize:
        plane *= v
    bad = idx.clone()
    mem = memory_order(bad)
    mem[5] = plane
    mem[2] = -1
    mem[9] = plane + 1000
    out, pos, guards = emu.unpool_fwd(x, bad, list(osize), int32)
    assert pos.item() == 2
    assert torch.isnan(guards).all(), "unpool wrote outside its output"
    dx, pos = emu.unpool_bwd(dy, x, bad, int32)
    assert pos.item() == 2
    assert (memory_order(dx)[[2, 5, 9]] == 0).all()
