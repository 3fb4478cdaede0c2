#pragma once
// im2col and col2im over a block of output columns, for the CPU convolution kernels.
//
// The im2col matrix of one sample and group has a row per (input channel, kernel tap) and a
// column per output position: col[(c, kd, kh, kw), (od, oh, ow)] = x[c, od*s-p+kd*d, ...], zero
// where the tap lands in the padding. A block of columns [n0, n0 + nc) is walked as runs that
// stay inside one output row, so the inner loops are contiguous copies when stride_w is 1.
#include <algorithm>
#include <cstdint>

#include "common/conv_shape.h"

namespace cnnops {
namespace cpu {

// One run of columns [col, col + count) of the block in one output row, for one im2col row.
// Columns [col + valid_begin, col + valid_end) read x_row[first_iw + j * stride_w]; the rest are
// padding.
template <typename T>
struct Im2colRun {
  int64_t col, count, valid_begin, valid_end;
  T* x_row;  // nullptr when the whole run reads padding (its d or h index is outside)
  int64_t first_iw;
};

// Calls fn(run) for every run of im2col row `r` over columns [n0, n0 + nc). `x` is the first
// channel of the group in this sample.
template <typename T, typename Fn>
inline void for_each_im2col_run(const ConvGeometry& g, T* x, int64_t r, int64_t n0, int64_t nc,
                                Fn&& fn) {
  const KernelTap tap = decompose_gemm_row(g, r);
  const int64_t out_w = g.out[2], out_h = g.out[1];
  int64_t w_lo, w_hi;  // output columns whose tap kw lands inside the input row
  valid_output_range(g.in[2], out_w, tap.kw, g.stride[2], g.pad[2], g.dilation[2], &w_lo, &w_hi);
  T* x_channel = x + tap.channel * g.in_plane();
  int64_t ow = n0 % out_w, t = n0 / out_w;
  int64_t oh = t % out_h, od = t / out_h;
  for (int64_t col = 0; col < nc;) {
    const int64_t count = std::min(out_w - ow, nc - col);
    const int64_t id = conv_input_index(od, tap.kd, g.stride[0], g.pad[0], g.dilation[0]);
    const int64_t ih = conv_input_index(oh, tap.kh, g.stride[1], g.pad[1], g.dilation[1]);
    const bool row_inside = id >= 0 && id < g.in[0] && ih >= 0 && ih < g.in[1];
    Im2colRun<T> run;
    run.col = col;
    run.count = count;
    run.valid_begin = std::clamp(w_lo - ow, int64_t(0), count);
    run.valid_end = std::clamp(w_hi - ow, run.valid_begin, count);
    run.x_row = row_inside ? x_channel + (id * g.in[1] + ih) * g.in[2] : nullptr;
    run.first_iw = conv_input_index(ow + run.valid_begin, tap.kw, g.stride[2], g.pad[2], g.dilation[2]);
    fn(run);
    col += count;
    ow += count;
    if (ow == out_w) {
      ow = 0;
      if (++oh == out_h) {
        oh = 0;
        ++od;
      }
    }
  }
}

// dst[j * dst_stride] = the run's im2col values, j in [0, run.count): zeros where the taps land
// in the padding, input elements (every stride_w-th) in between.
template <typename T>
inline void read_run(const Im2colRun<T>& run, int64_t stride_w, T* dst, int64_t dst_stride = 1) {
  const int64_t vb = run.valid_begin, ve = run.x_row ? run.valid_end : run.valid_begin;
  const T* src = run.x_row ? run.x_row + run.first_iw - vb * stride_w : nullptr;
  if (dst_stride == 1 && stride_w == 1) {  // the common case: contiguous copies
    std::fill(dst, dst + vb, T(0));
    std::copy(src + vb, src + ve, dst + vb);
    std::fill(dst + ve, dst + run.count, T(0));
    return;
  }
  for (int64_t j = 0; j < vb; ++j) dst[j * dst_stride] = T(0);
  for (int64_t j = vb; j < ve; ++j) dst[j * dst_stride] = src[j * stride_w];
  for (int64_t j = ve; j < run.count; ++j) dst[j * dst_stride] = T(0);
}

// Packs im2col rows [k0, k0 + kc) x output positions [l0, l0 + count) as GEMM B panels of NR
// columns, at panel columns [first_col, first_col + count).
template <typename T, int64_t NR>
void pack_im2col_panels(const ConvGeometry& g, const T* x, int64_t k0, int64_t kc, int64_t l0,
                        int64_t count, int64_t first_col, T* dst) {
  for (int64_t kk = 0; kk < kc; ++kk) {
    for_each_im2col_run(g, const_cast<T*>(x), k0 + kk, l0, count, [&](const Im2colRun<T>& run) {
      // Split the run at panel boundaries; each piece is contiguous in its panel row.
      for (int64_t done = 0; done < run.count;) {
        const int64_t col = first_col + run.col + done;
        const int64_t piece = std::min(run.count - done, NR - col % NR);
        Im2colRun<T> sub = run;
        sub.count = piece;
        sub.valid_begin = std::clamp(run.valid_begin - done, int64_t(0), piece);
        sub.valid_end = std::clamp(run.valid_end - done, sub.valid_begin, piece);
        sub.first_iw = run.first_iw + (done + sub.valid_begin - run.valid_begin) * g.stride[2];
        read_run(sub, g.stride[2], dst + (col / NR) * kc * NR + kk * NR + col % NR);
        done += piece;
      }
    });
  }
}

// Packs the transposed im2col block, B[i, r] = im2col[r, l0 + i], for i in [0, count) and
// columns r in [j0, j0 + jc), as GEMM B panels of NR columns and panel_rows rows (the block may
// fill only part of each panel): the weight gradient's operand.
template <typename T, int64_t NR>
void pack_im2col_transposed_panels(const ConvGeometry& g, const T* x, int64_t l0, int64_t count,
                                   int64_t j0, int64_t jc, int64_t panel_rows, T* dst) {
  for (int64_t j = 0; j < (jc + NR - 1) / NR * NR; ++j) {
    T* column = dst + (j / NR) * panel_rows * NR + j % NR;
    if (j >= jc) {  // zero padding of the last panel
      for (int64_t i = 0; i < count; ++i) column[i * NR] = T(0);
      continue;
    }
    for_each_im2col_run(g, const_cast<T*>(x), j0 + j, l0, count,
                        [&](const Im2colRun<T>& run) { read_run(run, g.stride[2], column + run.col * NR, NR); });
  }
}

// x += col2im(col) for columns [n0, n0 + nc): each im2col entry is added back to the input
// element it was read from (the backprop of im2col's copy).
template <typename T>
void col2im_add_block(const ConvGeometry& g, const T* col, int64_t ld, int64_t n0, int64_t nc, T* x) {
  for (int64_t r = 0; r < g.gemm_k(); ++r)
    for_each_im2col_run(g, x, r, n0, nc, [&](const Im2colRun<T>& run) {
      if (!run.x_row) return;
      const T* src = col + r * ld + run.col + run.valid_begin;
      T* dst = run.x_row + run.first_iw;
      const int64_t n = run.valid_end - run.valid_begin, s = g.stride[2];
      for (int64_t j = 0; j < n; ++j) dst[j * s] += src[j];
    });
}

}  // namespace cpu
}  // namespace cnnops
