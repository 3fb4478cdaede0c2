"""The CUDA normalization kernels' arithmetic and reduction order, run on the CPU (named without
"cuda" so scripts/gpu_check.sh, which runs tests/test_*cuda*.py, does not spend GPU time on it).

csrc/common/norm_cuda_math.h holds what the CUDA kernels (csrc/cuda/norm_kernels.cuh) compute
per element and per statistic: the launch shapes, the strided cursor of the planes reduction,
the per-element Welford and gradient-sum updates, the partial-buffer layout and the fixed merge
order of the second stage, the statistic/channel index of each element. Here that header is
compiled for the host and driven by a sequential emulation of the kernels' threads: every
thread's share, the warp-shuffle tree (shfl_down semantics, lanes past the warp keep their own
value), the cross-warp tree in shared memory, the column kernels' shared-memory tree, then the
second stage, exactly in the order the GPU merges. The host flow below mirrors csrc/cuda/norm.cu
op by op; results are compared with torch, so the GPU's index math and Welford/Chan merges are
checked on every run, with or without a GPU."""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = r"""
#include <torch/extension.h>
#include "common/norm_cuda_math.h"

using namespace cnnops;
using acc_t = double;
using Tensor = at::Tensor;
using Opt = c10::optional<at::Tensor>;

// ---- thread emulation ------------------------------------------------------------------------

// One warp-shuffle tree: every lane reads lane + offset before anyone merges; lanes whose
// source is past the warp read their own value (shfl_down semantics).
template <typename State>
void warp_tree(std::vector<State>& s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const std::vector<State> src = s;
    for (size_t t = 0; t < s.size(); ++t) {
      const int lane = static_cast<int>(t % 32);
      s[t].merge(lane + offset < 32 ? src[t + offset] : src[t]);
    }
  }
}

// block_reduce of norm_kernels.cuh for a 1-d block of s.size() threads.
template <typename State>
State block_reduce(std::vector<State> s) {
  warp_tree(s);
  const size_t warps = s.size() / 32;
  std::vector<State> w(32);
  for (size_t i = 0; i < 32; ++i) w[i] = i < warps ? s[i * 32] : State{};
  warp_tree(w);
  return w[0];
}

struct Partials {
  std::vector<acc_t> buffer;
  int64_t count = 0;
  int64_t chunks = 1;
};

// reduce_planes_kernel over the grid (channel, chunk).
template <typename Op>
Partials reduce_planes(const Op& op, int fields, int64_t outer, int64_t channels, int64_t inner) {
  using State = typename Op::State;
  const PlanesConfig cfg = planes_config(outer, channels, inner);
  Partials p;
  p.chunks = cfg.chunks;
  p.count = channels * p.chunks;
  p.buffer.assign(fields * p.count, std::nan(""));
  const int64_t total = outer * inner;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t k = 0; k < cfg.chunks; ++k) {
      const int64_t begin = k * cfg.chunk_len;
      const int64_t len = std::min(cfg.chunk_len, total - begin);
      std::vector<State> s(cfg.threads);
      for (int64_t t = 0; t < cfg.threads; ++t) {
        if (t >= len) continue;
        PlaneCursor<int64_t> cur(begin + t, inner, cfg.threads);
        for (int64_t j = t; j < len; j += cfg.threads) {
          op.plane(s[t], cur.offset(c, channels), c, cur.l);
          cur.advance();
        }
      }
      store_state(block_reduce(s), p.buffer.data(), c * cfg.chunks + k, p.count);
    }
  return p;
}

// reduce_columns_kernel over the grid (column block, chunk, batch).
template <typename Op>
Partials reduce_columns(const Op& op, int fields, int64_t batch, int64_t rows, int64_t cols) {
  using State = typename Op::State;
  const ColumnsConfig cfg = columns_config(batch, rows, cols);
  Partials p;
  p.chunks = cfg.chunks;
  p.count = batch * p.chunks * cols;
  p.buffer.assign(fields * p.count, std::nan(""));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < cfg.chunks; ++k)
      for (int64_t xb = 0; xb < cfg.col_blocks; ++xb) {
        const int64_t begin = k * cfg.chunk_len;
        const int64_t end = begin + std::min(rows - begin, cfg.chunk_len);
        std::vector<State> smem(kColumnThreadsX * kColumnThreadsY);
        for (int ty = 0; ty < kColumnThreadsY; ++ty)
          for (int tx = 0; tx < kColumnThreadsX; ++tx) {
            const int64_t col = xb * kColumnThreadsX + tx;
            State s;
            if (col < cols)
              for (int64_t r = begin + ty; r < end; r += kColumnThreadsY)
                op.column(s, (b * rows + r) * cols + col, b, r, col);
            smem[ty * kColumnThreadsX + tx] = s;
          }
        for (int half = kColumnThreadsY / 2; half > 0; half /= 2)
          for (int ty = 0; ty < half; ++ty)
            for (int tx = 0; tx < kColumnThreadsX; ++tx)
              smem[ty * kColumnThreadsX + tx].merge(smem[(ty + half) * kColumnThreadsX + tx]);
        for (int tx = 0; tx < kColumnThreadsX; ++tx) {
          const int64_t col = xb * kColumnThreadsX + tx;
          if (col < cols) store_state(smem[tx], p.buffer.data(), (b * cfg.chunks + k) * cols + col, p.count);
        }
      }
  return p;
}

// welford_finalize_kernel
void finalize_stats(const Partials& p, const PartialIndex& pi, int64_t outputs, acc_t* mean, acc_t* invstd,
                    acc_t* rm, acc_t* rv, acc_t momentum, acc_t eps) {
  for (int64_t o = 0; o < outputs; ++o) {
    const Welford<acc_t> w = merge_partials<Welford<acc_t>>(p.buffer.data(), p.count, pi, o);
    mean[o] = w.mean;
    invstd[o] = norm_invstd(w.biased_variance(), eps);
    if (rm != nullptr && w.count > 0) {
      rm[o] = running_stat_update(rm[o], w.mean, momentum);
      rv[o] = running_stat_update(rv[o], w.unbiased_variance(), momentum);
    }
  }
}

// sums_finalize_kernel
void finalize_sums(const Partials& p, const PartialIndex& pi, int64_t outputs, std::vector<acc_t>& a,
                   std::vector<acc_t>& b) {
  a.resize(outputs);
  b.resize(outputs);
  for (int64_t o = 0; o < outputs; ++o) {
    const SumPair<acc_t> s = merge_partials<SumPair<acc_t>>(p.buffer.data(), p.count, pi, o);
    a[o] = s.a;
    b[o] = s.b;
  }
}

const acc_t* ptr(const Opt& t) { return t.has_value() && t->defined() ? t->data_ptr<acc_t>() : nullptr; }

// normalize_kernel / grad_input_kernel
void normalize(bool cl, const Tensor& x, Tensor& y, const acc_t* mean, const acc_t* invstd, const acc_t* w,
               const acc_t* b, int64_t channels, int64_t inner, int64_t sps, int64_t cps) {
  const NormIndex<int64_t> ix(channels, inner, sps, cps);
  const acc_t* xp = x.data_ptr<acc_t>();
  acc_t* yp = y.data_ptr<acc_t>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    int64_t c, s;
    if (cl) ix.locate<true>(i, c, s);
    else ix.locate<false>(i, c, s);
    yp[i] = norm_output(xp[i], mean[s], invstd[s], w ? w[c] : 1.0, b ? b[c] : 0.0);
  }
}

void grad_input(bool cl, const Tensor& dy, const Tensor& x, Tensor& dx, const acc_t* mean, const acc_t* invstd,
                const acc_t* w, const acc_t* ca, const acc_t* cb, int64_t channels, int64_t inner, int64_t sps,
                int64_t cps) {
  const NormIndex<int64_t> ix(channels, inner, sps, cps);
  for (int64_t i = 0; i < x.numel(); ++i) {
    int64_t c, s;
    if (cl) ix.locate<true>(i, c, s);
    else ix.locate<false>(i, c, s);
    const acc_t wv = w ? w[c] : 1.0;
    dx.data_ptr<acc_t>()[i] = ca ? norm_grad_input(dy.data_ptr<acc_t>()[i], x.data_ptr<acc_t>()[i], mean[s],
                                                   invstd[s], wv, ca[s], cb[s])
                                 : norm_grad_input_eval(dy.data_ptr<acc_t>()[i], invstd[s], wv);
  }
}

int64_t spatial_of(const Tensor& x) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return s;
}

// ---- the ops, as csrc/cuda/norm.cu runs them (x already contiguous in its memory format) ----

std::vector<Tensor> bn_forward(Tensor x, Opt w, Opt b, Opt rm, Opt rv, bool training, double momentum,
                               double eps, bool cl) {
  const int64_t n = x.size(0), c = x.size(1), s = spatial_of(x);
  Tensor y = at::empty_like(x), mean = at::empty({c}, x.options()), invstd = at::empty({c}, x.options());
  if (training) {
    const WelfordOp<acc_t, acc_t> op{x.data_ptr<acc_t>()};
    Partials p;
    PartialIndex pi;
    if (cl || s == 1) {
      p = reduce_columns(op, 3, 1, n * s, c);
      pi = columns_partials(p.chunks, c, c, 1);
    } else {
      p = reduce_planes(op, 3, n, c, s);
      pi = planes_partials(p.chunks);
    }
    finalize_stats(p, pi, c, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), rm ? rm->data_ptr<acc_t>() : nullptr,
                   rv ? rv->data_ptr<acc_t>() : nullptr, momentum, eps);
  } else {
    for (int64_t i = 0; i < c; ++i) {
      mean.data_ptr<acc_t>()[i] = rm->data_ptr<acc_t>()[i];
      invstd.data_ptr<acc_t>()[i] = norm_invstd(rv->data_ptr<acc_t>()[i], eps);
    }
  }
  normalize(cl, x, y, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), ptr(w), ptr(b), c, s, 0, 1);
  return {y, mean, invstd};
}

std::vector<Tensor> bn_backward(Tensor dy, Tensor x, Opt w, Tensor mean, Tensor invstd, bool training, bool cl) {
  const int64_t n = x.size(0), c = x.size(1), s = spatial_of(x);
  const GradSumsOp<acc_t, acc_t, acc_t> op{dy.data_ptr<acc_t>(), x.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                                           invstd.data_ptr<acc_t>(), nullptr, 0, 1, false};
  Partials p;
  PartialIndex pi;
  if (cl || s == 1) {
    p = reduce_columns(op, 2, 1, n * s, c);
    pi = columns_partials(p.chunks, c, c, 1);
  } else {
    p = reduce_planes(op, 2, n, c, s);
    pi = planes_partials(p.chunks);
  }
  std::vector<acc_t> a, b;
  finalize_sums(p, pi, c, a, b);
  Tensor gw = at::empty({c}, x.options()), gb = at::empty({c}, x.options());
  std::vector<acc_t> ca(c), cb(c);
  const acc_t inv_m = 1.0 / static_cast<acc_t>(n * s);
  for (int64_t i = 0; i < c; ++i) {  // batch_norm_coeffs_kernel
    const acc_t dweight = norm_weight_grad(invstd.data_ptr<acc_t>()[i], b[i]);
    gw.data_ptr<acc_t>()[i] = dweight;
    gb.data_ptr<acc_t>()[i] = a[i];
    const acc_t wv = ptr(w) ? ptr(w)[i] : 1.0;
    ca[i] = wv * a[i] * inv_m;
    cb[i] = wv * dweight * inv_m;
  }
  Tensor dx = at::empty_like(x);
  grad_input(cl, dy, x, dx, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), ptr(w), training ? ca.data() : nullptr,
             training ? cb.data() : nullptr, c, s, 0, 1);
  return {dx, gw, gb};
}

std::vector<Tensor> ln_forward(Tensor x, int64_t cols, Opt w, Opt b, double eps) {
  const int64_t rows = x.numel() / cols;
  Tensor y = at::empty_like(x), mean = at::empty({rows}, x.options()), invstd = at::empty({rows}, x.options());
  const WelfordOp<acc_t, acc_t> op{x.data_ptr<acc_t>()};
  const Partials p = reduce_planes(op, 3, 1, rows, cols);
  finalize_stats(p, planes_partials(p.chunks), rows, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), nullptr, nullptr,
                 0, eps);
  normalize(true, x, y, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), ptr(w), ptr(b), cols, 1, 1, cols);
  return {y, mean, invstd};
}

std::vector<Tensor> ln_backward(Tensor dy, Tensor x, int64_t cols, Tensor mean, Tensor invstd, Opt w) {
  const int64_t rows = x.numel() / cols;
  const GradSumsOp<acc_t, acc_t, acc_t> rop{dy.data_ptr<acc_t>(), x.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                                            invstd.data_ptr<acc_t>(), ptr(w), 0, 1, false};
  const Partials p = reduce_planes(rop, 2, 1, rows, cols);
  std::vector<acc_t> a, b;
  finalize_sums(p, planes_partials(p.chunks), rows, a, b);
  std::vector<acc_t> ca(rows), cb(rows);
  for (int64_t r = 0; r < rows; ++r) {  // layer_norm_coeffs_kernel
    ca[r] = a[r] * (1.0 / cols);
    cb[r] = b[r] * invstd.data_ptr<acc_t>()[r] * (1.0 / cols);
  }
  Tensor dx = at::empty_like(x);
  grad_input(true, dy, x, dx, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), ptr(w), ca.data(), cb.data(), cols,
             1, 1, cols);
  const GradSumsOp<acc_t, acc_t, acc_t> cop{dy.data_ptr<acc_t>(), x.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                                            invstd.data_ptr<acc_t>(), nullptr, 0, 1, true};
  const Partials q = reduce_columns(cop, 2, 1, rows, cols);
  finalize_sums(q, columns_partials(q.chunks, cols, cols, 1), cols, a, b);
  Tensor gw = at::empty({cols}, x.options()), gb = at::empty({cols}, x.options());
  for (int64_t i = 0; i < cols; ++i) {
    gw.data_ptr<acc_t>()[i] = b[i];
    gb.data_ptr<acc_t>()[i] = a[i];
  }
  return {dx, gw, gb};
}

std::vector<Tensor> gn_forward(Tensor x, Opt w, Opt b, int64_t groups, double eps, bool cl) {
  const int64_t n = x.size(0), c = x.size(1), s = spatial_of(x), d = c / groups;
  Tensor y = at::empty_like(x), mean = at::empty({n, groups}, x.options());
  Tensor invstd = at::empty({n, groups}, x.options());
  const WelfordOp<acc_t, acc_t> op{x.data_ptr<acc_t>()};
  Partials p;
  PartialIndex pi;
  if (cl) {
    p = reduce_columns(op, 3, n, s, c);
    pi = columns_partials(p.chunks, c, groups, d);
  } else {
    p = reduce_planes(op, 3, 1, n * groups, d * s);
    pi = planes_partials(p.chunks);
  }
  finalize_stats(p, pi, n * groups, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), nullptr, nullptr, 0, eps);
  normalize(cl, x, y, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), ptr(w), ptr(b), c, s, groups, d);
  return {y, mean, invstd};
}

std::vector<Tensor> gn_backward(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Opt w, int64_t groups, bool cl) {
  const int64_t n = x.size(0), c = x.size(1), s = spatial_of(x), d = c / groups;
  const GradSumsOp<acc_t, acc_t, acc_t> op{dy.data_ptr<acc_t>(), x.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                                           invstd.data_ptr<acc_t>(), nullptr, groups, d, false};
  Partials p;
  PartialIndex pi;
  if (cl) {
    p = reduce_columns(op, 2, n, s, c);
    pi = columns_partials(p.chunks, c, c, 1);
  } else {
    p = reduce_planes(op, 2, 1, n * c, s);
    pi = planes_partials(p.chunks);
  }
  std::vector<acc_t> a, b;
  finalize_sums(p, pi, n * c, a, b);
  const acc_t* is = invstd.data_ptr<acc_t>();
  const acc_t* wp = ptr(w);
  std::vector<acc_t> ca(n * groups), cb(n * groups);
  for (int64_t o = 0; o < n * groups; ++o) {  // group_norm_coeffs_kernel
    const int64_t nn = o / groups, g = o % groups;
    acc_t sa = 0, sb = 0;
    for (int64_t k = 0; k < d; ++k) {
      const int64_t ch = g * d + k;
      const acc_t wv = wp ? wp[ch] : 1.0;
      sa += wv * a[nn * c + ch];
      sb += wv * b[nn * c + ch];
    }
    ca[o] = sa * (1.0 / (d * s));
    cb[o] = sb * is[o] * (1.0 / (d * s));
  }
  Tensor dx = at::empty_like(x);
  grad_input(cl, dy, x, dx, mean.data_ptr<acc_t>(), is, wp, ca.data(), cb.data(), c, s, groups, d);
  Tensor gw = at::empty({c}, x.options()), gb = at::empty({c}, x.options());
  for (int64_t ch = 0; ch < c; ++ch) {  // group_norm_param_grads_kernel
    acc_t sa = 0, sb = 0;
    for (int64_t nn = 0; nn < n; ++nn) {
      sa += a[nn * c + ch];
      sb += b[nn * c + ch] * is[nn * groups + ch / d];
    }
    gw.data_ptr<acc_t>()[ch] = sb;
    gb.data_ptr<acc_t>()[ch] = sa;
  }
  return {dx, gw, gb};
}

// The int32 index path of the elementwise kernels (magic-number division) against plain int64
// division: number of mismatching (channel, stat) pairs over the given element indices.
int64_t norm_index_mismatches(int64_t channels, int64_t inner, int64_t sps, int64_t cps, bool cl,
                              std::vector<int64_t> indices) {
  const NormIndex<int32_t> fast(static_cast<int32_t>(channels), static_cast<int32_t>(inner),
                                static_cast<int32_t>(sps), static_cast<int32_t>(cps));
  int64_t bad = 0;
  for (int64_t i : indices) {
    int32_t c, s;
    if (cl) fast.locate<true>(static_cast<int32_t>(i), c, s);
    else fast.locate<false>(static_cast<int32_t>(i), c, s);
    const int64_t n = i / (inner * channels);
    const int64_t ce = cl ? i % channels : (i / inner) % channels;
    const int64_t se = n * sps + ce / cps;
    bad += (c != ce || s != se);
  }
  return bad;
}

// Divider<int32_t> against n / d for the given divisors and dividends.
int64_t divider_mismatches(std::vector<int64_t> divisors, std::vector<int64_t> dividends) {
  int64_t bad = 0;
  for (int64_t d : divisors) {
    const Divider<int32_t> div(static_cast<int32_t>(d));
    for (int64_t n : dividends) bad += div.div(static_cast<int32_t>(n)) != n / d;
  }
  return bad;
}

int64_t planes_chunks(int64_t outer, int64_t channels, int64_t inner) {
  return planes_config(outer, channels, inner).chunks;
}
int64_t columns_chunks(int64_t batch, int64_t rows, int64_t cols) { return columns_config(batch, rows, cols).chunks; }
"""

FUNCTIONS = ["norm_index_mismatches", "divider_mismatches", "planes_chunks", "columns_chunks",
             "bn_forward", "bn_backward", "ln_forward", "ln_backward", "gn_forward", "gn_backward"]


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load_inline

    # A fixed folder: ninja then rebuilds only when the header or SOURCE changed.
    build = os.path.join(tempfile.gettempdir(), "cnnops_norm_kernel_math")
    os.makedirs(build, exist_ok=True)
    return load_inline(
        name="cnnops_norm_kernel_math",
        cpp_sources=SOURCE,
        functions=FUNCTIONS,
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O1"],
        build_directory=build,
        verbose=False,
    )


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol)


def layout(x, cl):
    if not cl:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def offset_input(shape, large_mean, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    return x + 1e4 if large_mean else x


# (shape, channels_last) -- shapes chosen to hit every branch: spatial 1 (columns view in NCHW),
# tiny and odd planes, chunked long reductions (> 4096 values per channel), several column
# blocks with a ragged last one, batch 1.
BN_CASES = [
    ((4, 3), False), ((7, 37), False), ((2, 5, 9), False), ((3, 4, 5, 7), False), ((3, 4, 5, 7), True),
    ((2, 3, 70, 90), False), ((2, 3, 70, 90), True), ((2, 33, 3, 5), True), ((2, 3, 2, 3, 4), True),
    ((64, 2, 130), False), ((2, 40, 1, 1), True), ((1, 3, 2, 5), True), ((5000, 3), False),
]


@pytest.mark.parametrize("shape,cl", BN_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("large_mean", [False, True])
def test_batch_norm_emulation(emu, shape, cl, large_mean):
    c = shape[1]
    x = offset_input(shape, large_mean, 1).requires_grad_()
    w = torch.randn(c, dtype=torch.float64).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.3, eps=1e-5)
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    xl = layout(x.detach(), cl)
    ye, mean, invstd = emu.bn_forward(xl, w.detach(), b.detach(), rm, rv, True, 0.3, 1e-5, cl)
    tol = 1e-9
    close(ye, y.detach(), tol)
    close(rm, rm_t, tol)
    close(rv, rv_t, tol)
    dims = [0] + list(range(2, x.dim()))
    close(mean, x.detach().mean(dims), tol)
    close(invstd, 1 / torch.sqrt(x.detach().var(dims, unbiased=False) + 1e-5), tol)
    dxe, dwe, dbe = emu.bn_backward(layout(dy, cl), xl, w.detach(), mean, invstd, True, cl)
    close(dxe, dx, tol)
    close(dwe, dw, tol)
    close(dbe, db, tol)
    # eval: running statistics, dx a per-channel scale
    ye, mean, invstd = emu.bn_forward(xl, w.detach(), b.detach(), rm, rv, False, 0.3, 1e-5, cl)
    x2 = x.detach().clone().requires_grad_()
    y2 = F.batch_norm(x2, rm, rv, w, b, training=False, eps=1e-5)
    close(ye, y2.detach(), tol)
    dx2, dw2, db2 = torch.autograd.grad(y2, (x2, w, b), dy)
    dxe, dwe, dbe = emu.bn_backward(layout(dy, cl), xl, w.detach(), mean, invstd, False, cl)
    close(dxe, dx2, tol)
    close(dwe, dw2, tol)
    close(dbe, db2, tol)


LN_CASES = [((4, 8), 1), ((3, 5, 7), 2), ((2, 3, 33), 1), ((6, 1000), 1), ((2, 9000), 1), ((1, 3, 4, 5), 3),
            ((300, 40), 1)]


@pytest.mark.parametrize("shape,k", LN_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("large_mean", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_emulation(emu, shape, k, large_mean, affine):
    ns = shape[-k:]
    cols = 1
    for s in ns:
        cols *= s
    x = offset_input(shape, large_mean, 2).requires_grad_()
    w = torch.randn(ns, dtype=torch.float64).requires_grad_() if affine else None
    b = torch.randn(ns, dtype=torch.float64).requires_grad_() if affine else None
    y = F.layer_norm(x, ns, w, b, eps=1e-5)
    dy = torch.randn_like(y)
    tol = 1e-9
    ye, mean, invstd = emu.ln_forward(x.detach(), cols, w.detach() if affine else None,
                                      b.detach() if affine else None, 1e-5)
    close(ye, y.detach(), tol)
    dxe, dwe, dbe = emu.ln_backward(dy, x.detach(), cols, mean, invstd, w.detach() if affine else None)
    if affine:
        dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
        close(dwe.view(ns), dw, tol)
        close(dbe.view(ns), db, tol)
    else:
        (dx,) = torch.autograd.grad(y, (x,), dy)
    close(dxe, dx, tol)


GN_CASES = [  # shape, groups, channels_last
    ((2, 6, 5), 3, False), ((2, 6, 4, 5), 2, False), ((2, 6, 4, 5), 2, True), ((3, 8, 3, 3), 8, False),
    ((3, 8, 3, 3), 8, True), ((1, 64, 9, 9), 32, True), ((1, 4, 90, 80), 1, False), ((1, 4, 90, 80), 2, True),
    ((2, 6, 2, 3, 4), 3, True), ((4, 70, 2, 3), 35, True), ((5, 4), 2, False), ((1, 4, 1, 1), 2, True),
]


@pytest.mark.parametrize("shape,groups,cl", GN_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("large_mean", [False, True])
def test_group_norm_emulation(emu, shape, groups, cl, large_mean):
    c = shape[1]
    x = offset_input(shape, large_mean, 3).requires_grad_()
    w = torch.randn(c, dtype=torch.float64).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    y = F.group_norm(x, groups, w, b, eps=1e-5)
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    tol = 1e-9
    xl = layout(x.detach(), cl)
    ye, mean, invstd = emu.gn_forward(xl, w.detach(), b.detach(), groups, 1e-5, cl)
    close(ye, y.detach(), tol)
    xg = x.detach().reshape(shape[0], groups, -1)
    close(mean, xg.mean(-1), tol)
    close(invstd, 1 / torch.sqrt(xg.var(-1, unbiased=False) + 1e-5), tol)
    dxe, dwe, dbe = emu.gn_backward(layout(dy, cl), xl, mean, invstd, w.detach(), groups, cl)
    close(dxe, dx, tol)
    close(dwe, dw, tol)
    close(dbe, db, tol)


def test_cases_reach_multi_chunk_merges(emu):
    """The cases above really split reductions into several chunks (else the second stage's
    merge order would go untested), in both views."""
    assert emu.planes_chunks(2, 3, 70 * 90) > 1     # batch norm NCHW (2, 3, 70, 90)
    assert emu.planes_chunks(1, 2, 9000) > 1        # layer norm rows of 9000
    assert emu.planes_chunks(1, 1, 4 * 90 * 80) > 1  # group norm (1, 4, 90, 80), one group
    assert emu.columns_chunks(1, 5000, 3) > 1       # batch norm (5000, 3)
    assert emu.columns_chunks(1, 2 * 70 * 90, 3) > 1  # batch norm NHWC (2, 3, 70, 90)
    assert emu.columns_chunks(1, 90 * 80, 4) > 1    # group norm NHWC (1, 4, 90, 80), per sample


def test_int32_divider_exact(emu):
    """Magic-number division (the int32 index path) equals integer division, at the edges of
    its range: every divisor shape (1, powers of two and their neighbours, primes, 2^31 - 1)
    and dividends near 0, near multiples and near 2^31 - 1."""
    import random
    rng = random.Random(0)
    top = 2**31 - 1
    divisors = {1, 2, 3, 5, 7, 10, 49, 64, 3136, 12544, 65535, 65536, 65537, 1 << 20, (1 << 30) - 1, 1 << 30,
                (1 << 30) + 1, top - 1, top}
    divisors |= {(1 << k) + e for k in range(1, 31) for e in (-1, 0, 1)}
    divisors |= {rng.randrange(1, top) for _ in range(200)}
    dividends = {0, 1, 2, top, top - 1, top - 2, 1 << 30, (1 << 30) - 1}
    dividends |= {rng.randrange(0, top) for _ in range(2000)}
    for d in list(divisors)[:60]:
        for q in (1, 2, 3, top // d // 2, top // d):
            for e in (-1, 0, 1):
                if 0 <= q * d + e <= top:
                    dividends.add(q * d + e)
    divisors = sorted(x for x in divisors if 1 <= x <= top)
    assert emu.divider_mismatches(divisors, sorted(dividends)) == 0


@pytest.mark.parametrize("channels,inner,sps,cps", [(3, 49, 0, 1), (64, 3136, 32, 2), (70, 6, 35, 2),
                                                   (1024, 1, 1, 1024), (6, 1, 0, 1), (2048, 49, 2048, 1)])
@pytest.mark.parametrize("cl", [False, True])
def test_int32_norm_index(emu, channels, inner, sps, cps, cl):
    """The elementwise kernels' int32 (channel, statistic) of an element equals the plain
    formula, for the first and last elements of tensors up to the int32 limit."""
    import random
    rng = random.Random(channels * inner)
    per_sample = channels * inner
    n = (2**31 - (1 << 25)) // per_sample  # the largest batch the int32 path accepts
    numel = n * per_sample
    idx = list(range(min(numel, 5000))) + list(range(max(numel - 5000, 0), numel))
    idx += [rng.randrange(numel) for _ in range(20000)]
    assert emu.norm_index_mismatches(channels, inner, sps, cps, cl, idx) == 0
