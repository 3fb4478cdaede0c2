"""The CUDA normalization kernels (csrc/cuda/norm_kernels.cuh), run on the CPU (named without
"cuda" so scripts/gpu_check.sh, which runs tests/test_*cuda*.py, does not spend GPU time on it).

The kernel header is compiled for the host through the shim of tests/test_pool_kernels_host.py
(__global__/__device__ vanish, threadIdx/blockIdx/blockDim/gridDim are globals), extended with
what the reductions need: each block's threads run as cooperative fibers on one OS thread, so
__syncthreads() and the warp shuffles (__shfl_down_sync: every lane reads lane + offset before
anyone goes on, lanes whose source is past the warp read their own value) behave as on the GPU,
and __shared__ variables are one per block. The host flow below launches the kernels op by op
as csrc/cuda/norm.cu does (same launch shapes for the reductions, small ragged grids for the
grid-stride kernels, int32 and int64 indices), and the results are compared with torch: a change
to a kernel's arithmetic, index math or merge order is tested on every run, with or without a
GPU."""
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
#include <ucontext.h>

#include <cstring>
#include <functional>
#include <stdexcept>

// ---- shim: the CUDA vocabulary on the host -------------------------------------------------
struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
  EmulatedDim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using dim3 = EmulatedDim3;
static EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// The threads of one block as fibers: each runs until it finishes or reaches a barrier
// (__syncthreads: the whole block; a shuffle: its warp); a barrier opens when every thread of
// the block (warp) that has not finished waits at it. A barrier that can never open (divergent
// __syncthreads) is an error.
namespace fibers {
enum Wait { kRunning, kBlock, kWarp, kDone };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  Wait wait = kRunning;
};
static std::vector<Fiber> all;
static ucontext_t scheduler;
static int current = -1;
static const std::function<void()>* body = nullptr;
static std::vector<uint64_t> exchange;  // shuffle values, one slot per thread

static void trampoline() {
  (*body)();
  all[current].wait = kDone;  // uc_link returns to the scheduler
}
static void wait_at(Wait w) {
  all[current].wait = w;
  swapcontext(&all[current].ctx, &scheduler);
}

static void run_block(const std::function<void()>& fn, int threads) {
  body = &fn;
  all.resize(threads);
  exchange.assign(threads, 0);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = all[t];
    f.stack.resize(256 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, trampoline, 0);
    f.wait = kRunning;
  }
  const int warps = (threads + 31) / 32;
  for (;;) {
    for (int t = 0; t < threads; ++t) {
      if (all[t].wait != kRunning) continue;
      current = t;
      threadIdx.x = t % blockDim.x;
      threadIdx.y = (t / blockDim.x) % blockDim.y;
      threadIdx.z = t / (blockDim.x * blockDim.y);
      swapcontext(&scheduler, &all[t].ctx);
    }
    bool released = false, any_block = false, all_block = true, all_done = true;
    for (int w = 0; w < warps; ++w) {
      bool warp_waits = false, warp_ready = true;
      for (int t = w * 32; t < std::min(threads, w * 32 + 32); ++t) {
        if (all[t].wait == kWarp) warp_waits = true;
        else if (all[t].wait != kDone) warp_ready = false;
      }
      if (warp_waits && warp_ready) {
        for (int t = w * 32; t < std::min(threads, w * 32 + 32); ++t)
          if (all[t].wait == kWarp) all[t].wait = kRunning;
        released = true;
      }
    }
    if (released) continue;
    for (const Fiber& f : all) {
      if (f.wait != kDone) all_done = false;
      if (f.wait == kBlock) any_block = true;
      else if (f.wait != kDone) all_block = false;
    }
    if (all_done) return;
    if (any_block && all_block) {
      for (Fiber& f : all)
        if (f.wait == kBlock) f.wait = kRunning;
      continue;
    }
    throw std::runtime_error("emulated block deadlocked: a barrier not reached by all threads");
  }
}
}  // namespace fibers

static void __syncthreads() { fibers::wait_at(fibers::kBlock); }

template <typename T>
static T __shfl_down_sync(unsigned /*mask*/, T v, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "one slot per value");
  const int t = fibers::current, lane = t % 32;
  std::memcpy(&fibers::exchange[t], &v, sizeof(T));
  fibers::wait_at(fibers::kWarp);  // every lane has written
  T out;
  std::memcpy(&out, &fibers::exchange[lane + offset < 32 ? t + offset : t], sizeof(T));
  fibers::wait_at(fibers::kWarp);  // every lane has read
  return out;
}

#include "cuda/norm_kernels.cuh"

using namespace cnnops;
using namespace cnnops::norm;
using acc_t = double;
using Tensor = at::Tensor;
using Opt = c10::optional<at::Tensor>;

// Runs kernel(args...) over grid x block, block by block.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  gridDim = grid;
  blockDim = block;
  const std::function<void()> fn = [&] { kernel(static_cast<Params>(args)...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        fibers::run_block(fn, static_cast<int>(block.x * block.y * block.z));
      }
}

// Grid-stride kernels: at most 3 blocks of 37 threads, so the stride does not divide the work.
template <typename... Params, typename... Args>
void launch_strided(void (*kernel)(Params...), int64_t total, Args... args) {
  const int64_t threads = 37;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(3, (total + threads - 1) / threads));
  launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)), args...);
}

// Index type of the launches below (norm.cu picks int32 when the tensor allows it).
static bool use_int32 = true;

struct Partials {
  std::vector<acc_t> buffer;
  int64_t count = 0;
  int64_t chunks = 1;
};

// reduce_planes of norm.cu: a block per (channel, chunk), planes_config's threads.
template <typename Op>
Partials reduce_planes(const Op& op, int fields, int64_t outer, int64_t channels, int64_t inner) {
  const PlanesConfig cfg = planes_config(outer, channels, inner);
  Partials p;
  p.chunks = cfg.chunks;
  p.count = channels * p.chunks;
  p.buffer.assign(fields * p.count, std::nan(""));
  const dim3 grid(static_cast<unsigned>(channels), static_cast<unsigned>(p.chunks));
  const dim3 block(static_cast<unsigned>(cfg.threads));
  if (use_int32)
    launch(&reduce_planes_kernel<Op, acc_t, int32_t>, grid, block, op, p.buffer.data(), outer, channels, inner,
           cfg.chunk_len, p.count);
  else
    launch(&reduce_planes_kernel<Op, acc_t, int64_t>, grid, block, op, p.buffer.data(), outer, channels, inner,
           cfg.chunk_len, p.count);
  return p;
}

// reduce_columns of norm.cu: blocks of kColumnThreadsX x kColumnThreadsY over (column block,
// chunk, batch).
template <typename Op>
Partials reduce_columns(const Op& op, int fields, int64_t batch, int64_t rows, int64_t cols) {
  const ColumnsConfig cfg = columns_config(batch, rows, cols);
  Partials p;
  p.chunks = cfg.chunks;
  p.count = batch * p.chunks * cols;
  p.buffer.assign(fields * p.count, std::nan(""));
  const dim3 grid(static_cast<unsigned>(cfg.col_blocks), static_cast<unsigned>(p.chunks),
                  static_cast<unsigned>(cfg.grid_z));
  const dim3 block(kColumnThreadsX, kColumnThreadsY);
  if (use_int32)
    launch(&reduce_columns_kernel<Op, acc_t, int32_t>, grid, block, op, p.buffer.data(), batch, rows, cols,
           cfg.chunk_len, p.count);
  else
    launch(&reduce_columns_kernel<Op, acc_t, int64_t>, grid, block, op, p.buffer.data(), batch, rows, cols,
           cfg.chunk_len, p.count);
  return p;
}

void finalize_stats(const Partials& p, const PartialIndex& pi, int64_t outputs, acc_t* mean, acc_t* invstd,
                    acc_t* rm, acc_t* rv, acc_t momentum, acc_t eps) {
  launch_strided(&welford_finalize_kernel<acc_t, acc_t>, outputs, p.buffer.data(), p.count, pi, outputs, mean,
                 invstd, rm, rv, momentum, eps);
}

void finalize_sums(const Partials& p, const PartialIndex& pi, int64_t outputs, std::vector<acc_t>& a,
                   std::vector<acc_t>& b) {
  a.assign(outputs, std::nan(""));
  b.assign(outputs, std::nan(""));
  launch_strided(&sums_finalize_kernel<acc_t>, outputs, p.buffer.data(), p.count, pi, outputs, a.data(), b.data());
}

const acc_t* ptr(const Opt& t) { return t.has_value() && t->defined() ? t->data_ptr<acc_t>() : nullptr; }

// launch_normalize / launch_grad_input of norm.cu.
template <typename index_t>
void normalize_as(bool cl, const Tensor& x, Tensor& y, const acc_t* mean, const acc_t* invstd, const acc_t* w,
                  const acc_t* b, int64_t channels, int64_t inner, int64_t sps, int64_t cps) {
  const NormIndex<index_t> ix(static_cast<index_t>(channels), static_cast<index_t>(inner),
                              static_cast<index_t>(sps), static_cast<index_t>(cps));
  auto kernel = cl ? normalize_kernel<true, acc_t, acc_t, acc_t, index_t>
                   : normalize_kernel<false, acc_t, acc_t, acc_t, index_t>;
  launch_strided(kernel, x.numel(), x.data_ptr<acc_t>(), y.data_ptr<acc_t>(), mean, invstd, w, b, ix, x.numel());
}
void normalize(bool cl, const Tensor& x, Tensor& y, const acc_t* mean, const acc_t* invstd, const acc_t* w,
               const acc_t* b, int64_t channels, int64_t inner, int64_t sps, int64_t cps) {
  if (use_int32) normalize_as<int32_t>(cl, x, y, mean, invstd, w, b, channels, inner, sps, cps);
  else normalize_as<int64_t>(cl, x, y, mean, invstd, w, b, channels, inner, sps, cps);
}

template <typename index_t>
void grad_input_as(bool cl, const Tensor& dy, const Tensor& x, Tensor& dx, const acc_t* mean, const acc_t* invstd,
                   const acc_t* w, const acc_t* cg, const acc_t* cx, int64_t channels, int64_t inner, int64_t sps,
                   int64_t cps) {
  const NormIndex<index_t> ix(static_cast<index_t>(channels), static_cast<index_t>(inner),
                              static_cast<index_t>(sps), static_cast<index_t>(cps));
  auto kernel = cl ? grad_input_kernel<true, acc_t, acc_t, acc_t, index_t>
                   : grad_input_kernel<false, acc_t, acc_t, acc_t, index_t>;
  launch_strided(kernel, x.numel(), dy.data_ptr<acc_t>(), x.data_ptr<acc_t>(), dx.data_ptr<acc_t>(), mean, invstd,
                 w, cg, cx, ix, x.numel());
}
void grad_input(bool cl, const Tensor& dy, const Tensor& x, Tensor& dx, const acc_t* mean, const acc_t* invstd,
                const acc_t* w, const acc_t* cg, const acc_t* cx, int64_t channels, int64_t inner, int64_t sps,
                int64_t cps) {
  if (use_int32) grad_input_as<int32_t>(cl, dy, x, dx, mean, invstd, w, cg, cx, channels, inner, sps, cps);
  else grad_input_as<int64_t>(cl, dy, x, dx, mean, invstd, w, cg, cx, channels, inner, sps, cps);
}

int64_t spatial_of(const Tensor& x) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return s;
}

void set_int32(bool on) { use_int32 = on; }

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
    launch_strided(&running_stats_kernel<acc_t, acc_t>, c, rm->data_ptr<acc_t>(), rv->data_ptr<acc_t>(), c,
                   mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), static_cast<acc_t>(eps));
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
  std::vector<acc_t> cg(c, std::nan("")), cx(c, std::nan(""));
  launch_strided(&batch_norm_coeffs_kernel<acc_t, acc_t>, c, a.data(), b.data(), invstd.data_ptr<acc_t>(), ptr(w),
                 c, static_cast<acc_t>(n * s), gw.data_ptr<acc_t>(), gb.data_ptr<acc_t>(),
                 training ? cg.data() : nullptr, training ? cx.data() : nullptr);
  Tensor dx = at::empty_like(x);
  grad_input(cl, dy, x, dx, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), ptr(w), training ? cg.data() : nullptr,
             training ? cx.data() : nullptr, c, s, 0, 1);
  return {dx, gw, gb};
}

// batch_norm_stats and batch_norm_backward_elemt of csrc/cuda/sync_batch_norm.cu.
std::vector<Tensor> bn_stats(Tensor x, bool cl) {
  const int64_t n = x.size(0), c = x.size(1), s = spatial_of(x);
  Tensor mean = at::empty({c}, x.options()), m2 = at::empty({c}, x.options());
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
  launch_strided(&welford_mean_m2_kernel<acc_t>, c, p.buffer.data(), p.count, pi, c, mean.data_ptr<acc_t>(),
                 m2.data_ptr<acc_t>());
  return {mean, m2};
}

Tensor bn_backward_elemt(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Opt w, Tensor sum_dy, Tensor sum_dy_xmu,
                         int64_t count, bool cl) {
  const int64_t c = x.size(1), s = spatial_of(x);
  std::vector<acc_t> cg(c, std::nan("")), cx(c, std::nan(""));
  launch_strided(&batch_norm_coeffs_kernel<acc_t, acc_t>, c, sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>(),
                 invstd.data_ptr<acc_t>(), ptr(w), c, static_cast<acc_t>(count), static_cast<acc_t*>(nullptr),
                 static_cast<acc_t*>(nullptr), cg.data(), cx.data());
  Tensor dx = at::empty_like(x);
  grad_input(cl, dy, x, dx, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), ptr(w), cg.data(), cx.data(), c, s, 0,
             1);
  return dx;
}

std::vector<Tensor> ln_forward(Tensor x, int64_t cols, Opt w, Opt b, double eps) {
  const int64_t rows = x.numel() / cols;
  Tensor y = at::empty_like(x), mean = at::empty({rows}, x.options()), invstd = at::empty({rows}, x.options());
  const WelfordOp<acc_t, acc_t> op{x.data_ptr<acc_t>()};
  const Partials p = reduce_planes(op, 3, 1, rows, cols);
  finalize_stats(p, planes_partials(p.chunks), rows, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), nullptr,
                 nullptr, 0, eps);
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
  std::vector<acc_t> cg(rows, std::nan("")), cx(rows, std::nan(""));
  launch_strided(&layer_norm_coeffs_kernel<acc_t>, rows, a.data(), b.data(), invstd.data_ptr<acc_t>(), rows,
                 static_cast<acc_t>(cols), cg.data(), cx.data());
  Tensor dx = at::empty_like(x);
  grad_input(true, dy, x, dx, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), ptr(w), cg.data(), cx.data(), cols,
             1, 1, cols);
  const GradSumsOp<acc_t, acc_t, acc_t> cop{dy.data_ptr<acc_t>(), x.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                                            invstd.data_ptr<acc_t>(), nullptr, 0, 1, true};
  const Partials q = reduce_columns(cop, 2, 1, rows, cols);
  finalize_sums(q, columns_partials(q.chunks, cols, cols, 1), cols, a, b);
  Tensor gw = at::empty({cols}, x.options()), gb = at::empty({cols}, x.options());
  launch_strided(&cast_pair_kernel<acc_t, acc_t>, cols, a.data(), b.data(), cols, gw.data_ptr<acc_t>(),
                 gb.data_ptr<acc_t>());
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
  std::vector<acc_t> cg(n * groups, std::nan("")), cx(n * groups, std::nan(""));
  launch_strided(&group_norm_coeffs_kernel<acc_t, acc_t>, n * groups, a.data(), b.data(), is, ptr(w), n, c, groups,
                 static_cast<acc_t>(d * s), cg.data(), cx.data());
  Tensor dx = at::empty_like(x);
  grad_input(cl, dy, x, dx, mean.data_ptr<acc_t>(), is, ptr(w), cg.data(), cx.data(), c, s, groups, d);
  Tensor gw = at::empty({c}, x.options()), gb = at::empty({c}, x.options());
  launch_strided(&group_norm_param_grads_kernel<acc_t, acc_t>, c, a.data(), b.data(), is, n, c, groups,
                 gw.data_ptr<acc_t>(), gb.data_ptr<acc_t>());
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

FUNCTIONS = ["norm_index_mismatches", "divider_mismatches", "planes_chunks", "columns_chunks", "set_int32",
             "bn_forward", "bn_backward", "bn_stats", "bn_backward_elemt", "ln_forward", "ln_backward",
             "gn_forward", "gn_backward"]


HEADERS = ["cuda/norm_kernels.cuh", "common/norm_cuda_math.h", "common/norm_math.h", "common/welford.h",
           "common/macros.h"]


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load_inline

    # A folder per checkout: ninja then rebuilds only when the headers or SOURCE changed.
    build = os.path.join(tempfile.gettempdir(), f"cnnops_norm_kernel_math_{zlib.crc32(ROOT.encode()):08x}")
    os.makedirs(build, exist_ok=True)
    # load_inline rebuilds when its source text changes, not when a header does: name the
    # headers' contents in the source.
    digest = hashlib.sha1()
    for header in HEADERS:
        with open(os.path.join(ROOT, "csrc", header), "rb") as f:
            digest.update(f.read())
    return load_inline(
        name="cnnops_norm_kernel_math",
        cpp_sources=SOURCE + f"\n// headers {digest.hexdigest()}\n",
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
    emu.set_int32(not large_mean)  # both index types of every kernel
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


@pytest.mark.parametrize("shape,cl", [((4, 3), False), ((2, 3, 70, 90), False), ((2, 3, 70, 90), True),
                                      ((2, 33, 3, 5), True), ((5000, 3), False)], ids=lambda v: str(v))
def test_sync_batch_norm_emulation(emu, shape, cl):
    """SyncBatchNorm's pieces (csrc/cuda/sync_batch_norm.cu): per-channel mean and m2, and
    grad_input from given sums and count, against torch's batch norm on the whole batch."""
    emu.set_int32(True)
    c = shape[1]
    x = offset_input(shape, True, 4).requires_grad_()
    w = torch.randn(c, dtype=torch.float64)
    dims = [0] + list(range(2, x.dim()))
    xl = layout(x.detach(), cl)
    mean, m2 = emu.bn_stats(xl, cl)
    xd = x.detach()
    close(mean, xd.mean(dims))
    close(m2, ((xd - xd.mean(dims, keepdim=True)) ** 2).sum(dims), 1e-7)
    y = F.batch_norm(x, None, None, w, None, training=True, eps=1e-5)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    invstd = 1 / torch.sqrt(xd.var(dims, unbiased=False) + 1e-5)
    sum_dy = dy.sum(dims)
    sum_dy_xmu = (dy * (xd - xd.mean(dims, keepdim=True))).sum(dims)
    count = xd.numel() // c
    dxe = emu.bn_backward_elemt(layout(dy, cl), xl, mean, invstd, w, sum_dy, sum_dy_xmu, count, cl)
    close(dxe, dx)


LN_CASES = [((4, 8), 1), ((3, 5, 7), 2), ((2, 3, 33), 1), ((6, 1000), 1), ((2, 9000), 1), ((1, 3, 4, 5), 3),
            ((300, 40), 1)]


@pytest.mark.parametrize("shape,k", LN_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("large_mean", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_emulation(emu, shape, k, large_mean, affine):
    emu.set_int32(not large_mean)  # both index types of every kernel
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
    emu.set_int32(not large_mean)  # both index types of every kernel
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


@pytest.mark.parametrize("channels,inner,sps,cps", [
    (3, 49, 0, 1), (64, 3136, 32, 2), (70, 6, 35, 2), (1024, 1, 1, 1024), (6, 1, 0, 1), (2048, 49, 2048, 1)])
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
