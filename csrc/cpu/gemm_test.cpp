// cnnops._C.gemm_spec() and cnnops._C.gemm(): the CPU GEMM (gemm.h) called directly, so
// tests/test_gemm.py can sweep M, N and K around the micro-kernel's MR, NR and KC for each ISA
// instead of reaching it only through whole convolutions. Not an op: no schema, no autograd.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <ctime>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/simd.h"

#if CNNOPS_X86
#include <immintrin.h>
#endif

namespace cnnops::cpu {
namespace {

namespace py = pybind11;

// The spec of the micro-kernel this process runs (CNNOPS_CPU_ISA caps it).
py::dict spec_dict() {
  const GemmSpec& spec = gemm_spec();
  py::dict d;
  d["name"] = spec.name;
  d["mr"] = spec.mr;
  d["kc"] = spec.kc;
  d["mc"] = spec.mc;
  d["nc"] = spec.nc;
  d["l2_bytes"] = l2_cache_bytes();
  d["nr_float32"] = spec.nr<float>();
  d["nr_float64"] = spec.nr<double>();
  return d;
}

// C = activation(init + A * B) on rows [row_begin, row_end) through one of the GEMM's entry
// points ("packed": gemm() with pack_a and pack_b_strided; "a_transposed": pack_a from a
// column-major A; "shifted_b": gemm_shifted_b; "shifted_a": gemm_shifted_a, whole rows, init 0,
// no activation; "panel_offset": gemm() writing each NR-column panel at its own offset;
// "packed_b" and "shifted_a_packed_b": gemm_packed_b and gemm_shifted_a_packed_b reading B packed
// beforehand, whole rows, no bias).
template <typename T>
void run(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, const T* bias, bool accumulate, int64_t row_begin,
         int64_t row_end, Activation act, const std::string& variant) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1), nr = gemm_nr<T>(), mr = gemm_mr<T>();
  const T* bp = b.const_data_ptr<T>();
  auto pack_b = [&](int64_t k0, int64_t kc, int64_t n0, int64_t nc, T* dst) {
    pack_b_strided<T>(bp, n, 1, k0, kc, n0, nc, dst);
    zero_panel_tail<T>(kc, nc, dst);
  };
  const auto workspace = scratch<T>(gemm_workspace_size<T>(n));
  T* cp = c.mutable_data_ptr<T>();
  if (variant == "packed" || variant == "panel_offset") {
    const PackedA<T> pa = pack_a<T>(m, k, a.const_data_ptr<T>(), k, 1);
    if (variant == "packed") {
      gemm<T>(pa, n, pack_b, cp, n, bias, accumulate, workspace.get(), row_begin, row_end, act);
      return;
    }
    // Panel p lands 3 columns further right than the last: a wider C with gaps between panels.
    const int64_t panels = ceil_div(n, nr), step = nr + 3;
    std::vector<int64_t> offsets(panels);
    at::Tensor wide = at::full({m, panels * step}, 7, c.options());
    for (int64_t p = 0; p < panels; ++p) {
      offsets[p] = p * step;
      const int64_t w = std::min(nr, n - p * nr);
      wide.narrow(1, p * step, w).copy_(c.narrow(1, p * nr, w));
    }
    gemm<T>(pa, n, pack_b, wide.mutable_data_ptr<T>(), panels * step, bias, accumulate, workspace.get(), row_begin,
            row_end, act, offsets.data());
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t w = std::min(nr, n - p * nr);
      c.narrow(1, p * nr, w).copy_(wide.narrow(1, p * step, w));
    }
  } else if (variant == "a_transposed") {
    const at::Tensor at_ = a.t().contiguous();  // A[i, kk] = at_[kk * m + i]
    const PackedA<T> pa = pack_a<T>(m, k, at_.const_data_ptr<T>(), 1, m);
    gemm<T>(pa, n, pack_b, cp, n, bias, accumulate, workspace.get(), row_begin, row_end, act);
  } else if (variant == "shifted_b") {
    // B[kk, j] = b[row_offset[kk] + j], read where it lies: no read may pass a row's last column.
    std::vector<int64_t> row_offset(k);
    for (int64_t kk = 0; kk < k; ++kk) row_offset[kk] = kk * n;
    const PackedA<T> pa = pack_a<T>(m, k, a.const_data_ptr<T>(), k, 1);
    gemm_shifted_b<T>(pa, n, bp, row_offset.data(), cp, n, bias, accumulate, row_begin, row_end, act);
  } else if (variant == "shifted_a") {
    TORCH_CHECK(bias == nullptr && !accumulate && row_begin == 0 && row_end == -1 && act == Activation::None,
                "gemm(): variant 'shifted_a' computes whole rows from 0, without activation");
    // A[i, kk] = padded[column_offset[kk] + i * k]; reads reach row M rounded up to MR.
    at::Tensor padded = at::zeros({(ceil_div(m, mr) * mr + 1) * k}, a.options());
    padded.narrow(0, 0, m * k).copy_(a.reshape(-1));
    std::vector<int64_t> column_offset(k);
    for (int64_t kk = 0; kk < k; ++kk) column_offset[kk] = kk;
    gemm_shifted_a<T>(m, k, padded.const_data_ptr<T>(), k, column_offset.data(), n, pack_b, cp, n, workspace.get());
  } else if (variant == "packed_b" || variant == "shifted_a_packed_b") {
    TORCH_CHECK(bias == nullptr && row_begin == 0 && row_end == -1, "gemm(): variant '", variant,
                "' computes whole rows, without bias");
    // B packed whole beforehand, reduction block by block: block k0 at k0 * padded_n.
    const int64_t padded_n = ceil_div(n, nr) * nr, block = gemm_spec().kc;
    std::vector<T> packed_b(std::max<int64_t>(k, 1) * padded_n);
    for (int64_t k0 = 0; k0 < k; k0 += block)
      pack_b(k0, std::min(block, k - k0), 0, n, packed_b.data() + k0 * padded_n);
    auto panel = [&](int64_t k0, int64_t kc, int64_t j0) {
      return packed_b.data() + k0 * padded_n + j0 / nr * kc * nr;
    };
    if (variant == "packed_b") {
      const PackedA<T> pa = pack_a<T>(m, k, a.const_data_ptr<T>(), k, 1);
      gemm_packed_b<T>(pa, n, panel, cp, n, accumulate, act);
      return;
    }
    at::Tensor padded = at::zeros({(ceil_div(m, mr) * mr + 1) * k}, a.options());
    padded.narrow(0, 0, m * k).copy_(a.reshape(-1));
    std::vector<int64_t> column_offset(k);
    for (int64_t kk = 0; kk < k; ++kk) column_offset[kk] = kk;
    gemm_shifted_a_packed_b<T>(m, k, padded.const_data_ptr<T>(), k, column_offset.data(), n, panel, cp, n, accumulate,
                               act);
  } else {
    TORCH_CHECK(false, "gemm(): unknown variant '", variant, "'");
  }
}

// Returns a copy of c updated in rows [row_begin, row_end) (row_end -1: all rows), or c itself
// when inplace (a contiguous c; for benchmarks/bench_gemm.py, which must not time a copy of C).
at::Tensor gemm_entry(const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& c_,
                      const std::optional<at::Tensor>& row_bias, bool accumulate, int64_t row_begin, int64_t row_end,
                      const std::string& activation, const std::string& variant, bool inplace) {
  TORCH_CHECK(a_.dim() == 2 && b_.dim() == 2 && c_.dim() == 2, "gemm(): a, b and c must be 2-d");
  TORCH_CHECK(a_.device().is_cpu() && b_.device().is_cpu() && c_.device().is_cpu(), "gemm(): CPU tensors only");
  const auto dtype = a_.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "gemm(): float32 or float64, got ", dtype);
  TORCH_CHECK(b_.scalar_type() == dtype && c_.scalar_type() == dtype, "gemm(): a, b and c must share a dtype");
  const int64_t m = a_.size(0), k = a_.size(1), n = b_.size(1);
  TORCH_CHECK(b_.size(0) == k && c_.size(0) == m && c_.size(1) == n, "gemm(): expected b of ", k, " rows and c of ", m,
              " x ", n);
  const int64_t end = row_end < 0 ? m : row_end;
  TORCH_CHECK(row_begin >= 0 && row_begin % gemm_mr<float>() == 0 && row_begin <= end && end <= m,
              "gemm(): row_begin must be a multiple of mr and 0 <= row_begin <= row_end <= M");
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  TORCH_CHECK(!inplace || c_.is_contiguous(), "gemm(): inplace needs a contiguous c");
  at::Tensor c = inplace ? c_ : c_.clone(at::MemoryFormat::Contiguous);
  at::Tensor bias;
  if (row_bias.has_value() && row_bias->defined()) {
    bias = row_bias->contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == m && bias.scalar_type() == dtype,
                "gemm(): row_bias must have M values of a's dtype");
  }
  const Activation act = parse_activation(activation);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gemm", [&] {
    run<scalar_t>(a, b, c, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, accumulate, row_begin, row_end,
                  act, variant);
  });
  return c;
}

// The micro-kernel in L1 (gemm_micro_kernel_seconds): min over `trials` timings of `reps` calls.
py::dict micro_kernel(bool wide, int64_t kc, int64_t reps, int64_t trials) {
  TORCH_CHECK(kc >= 1 && reps >= 1 && trials >= 1, "gemm_micro_kernel(): kc, reps and trials must be positive");
  int64_t mr = 0;
  double best = 0;
  for (int64_t t = 0; t < trials; ++t) {
    const double s = gemm_micro_kernel_seconds(wide, kc, reps, &mr);
    best = t == 0 ? s : std::min(best, s);
  }
  py::dict d;
  d["mr"] = mr;
  d["nr"] = gemm_nr<float>();
  d["seconds"] = best;
  d["gflops"] = 2.0 * double(mr * gemm_nr<float>() * kc * reps) / best / 1e9;
  return d;
}

#if CNNOPS_X86
// What the micro-kernel is measured against: 24 independent AVX-512 FMA chains on registers, no
// loads (two FMA ports of 4 cycles' latency need 8 in flight). Float32 GFLOP/s, min of `trials`.
CNNOPS_TARGET_AVX512 __attribute__((noinline)) double fma_peak_avx512(int64_t reps, int64_t trials) {
  double best = 0;
  for (int64_t t = 0; t < trials; ++t) {
    __m512 acc[24];
    const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-3f);
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(float(i));
    timespec t0, t1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    for (int64_t r = 0; r < reps; ++r) {
#pragma GCC unroll 24
      for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(x, acc[i], y);
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    __m512 sum = acc[0];
    for (int i = 1; i < 24; ++i) sum = _mm512_add_ps(sum, acc[i]);
    volatile float keep = _mm512_reduce_add_ps(sum);  // the chains must not be optimised away
    (void)keep;
    const double s = double(t1.tv_sec - t0.tv_sec) + 1e-9 * double(t1.tv_nsec - t0.tv_nsec);
    best = std::max(best, 2.0 * 16 * 24 * double(reps) / s / 1e9);
  }
  return best;
}
#endif

double fma_peak(int64_t reps, int64_t trials) {
#if CNNOPS_X86
  if (cpu_isa() == Isa::Avx512) return fma_peak_avx512(reps, trials);
#endif
  TORCH_CHECK(false, "fma_peak(): AVX-512 only");
}

// Offsets from a cache line of the kernels' buffers (scratch.h): Scratch and OperandVector of sizes
// 1 to 2^20 values, float and double.
std::vector<int64_t> operand_misalignments() {
  std::vector<int64_t> out;
  for (int64_t n = 1; n <= (int64_t(1) << 20); n *= 4) {
    out.push_back(int64_t(reinterpret_cast<uintptr_t>(scratch<float>(n).get()) % kOperandAlignment));
    out.push_back(int64_t(reinterpret_cast<uintptr_t>(scratch<double>(n + 1).get()) % kOperandAlignment));
    OperandVector<float> v(n);
    out.push_back(int64_t(reinterpret_cast<uintptr_t>(v.data()) % kOperandAlignment));
  }
  return out;
}

}  // namespace

void add_gemm_test_functions(PyObject* module) {
  py::module_ m = py::reinterpret_borrow<py::module_>(module);
  m.def("gemm_spec", &spec_dict, "The spec (name, mr, kc, mc, nc, nr per dtype) of the CPU GEMM micro-kernel in use.");
  m.def("gemm", &gemm_entry, "The CPU GEMM called directly (tests/test_gemm.py).", py::arg("a"), py::arg("b"),
        py::arg("c"), py::arg("row_bias"), py::arg("accumulate"), py::arg("row_begin"), py::arg("row_end"),
        py::arg("activation"), py::arg("variant"), py::arg("inplace") = false);
  m.def("gemm_micro_kernel", &micro_kernel,
        "The float32 micro-kernel alone with its panels in L1 (gemm(), or wide: gemm_shifted_a_packed_b's): "
        "mr, nr, seconds (min of trials) and GFLOP/s.",
        py::arg("wide"), py::arg("kc"), py::arg("reps"), py::arg("trials") = 5);
  m.def("operand_misalignments", &operand_misalignments,
        "Offsets from a cache line of freshly allocated kernel buffers (scratch.h): all 0.");
  m.def("fma_peak_gflops", &fma_peak, "Float32 AVX-512 FMA throughput on registers (GFLOP/s, best of trials).",
        py::arg("reps"), py::arg("trials") = 5);
}

}  // namespace cnnops::cpu
