// Every cnnops schema, in one place. Each kernel file registers the ops it implements in one
// TORCH_LIBRARY_IMPL(cnnops, <key>, m) block at its end: CPU in csrc/cpu, CUDA in csrc/cuda,
// Autograd in csrc/autograd, AutocastCPU/AutocastCUDA in csrc/autocast; an op without tensor
// arguments (cpu_gemm_isa) under CompositeExplicitAutograd. Fake implementations for tracing
// live in cnnops/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <vector>

namespace cnnops::python {
PyMethodDef* fast_call_methods();  // csrc/python/fast_call.cpp
PyMethodDef* backend_methods();    // csrc/python/backends.cpp
}  // namespace cnnops::python
namespace cnnops::cpu {
void add_gemm_test_functions(PyObject* module);  // csrc/cpu/gemm_test.cpp
}

extern "C" {
// `import cnnops._C` loads this library (the ops register through TORCH_LIBRARY) and gives
// Python its fast call path (op, call), the CPU backend switches (csrc/python/backends.cpp) and
// the CPU GEMM's test entry points (gemm_spec, gemm).
PyObject* PyInit__C(void) {
  static std::vector<PyMethodDef> methods = [] {
    std::vector<PyMethodDef> all;
    for (PyMethodDef* table : {cnnops::python::fast_call_methods(), cnnops::python::backend_methods()})
      for (; table->ml_name != nullptr; ++table) all.push_back(*table);
    all.push_back({nullptr, nullptr, 0, nullptr});
    return all;
  }();
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods.data()};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) cnnops::cpu::add_gemm_test_functions(module);
  return module;
}
}

TORCH_LIBRARY(cnnops, m) {
  // Convolution, 1d/2d/3d (weight rank picks the dims). Symmetric zero padding; the Python
  // layer pads asymmetric 'same' and non-zero padding modes first, as torch does.
  // activation: "none" or "relu", applied in the kernels' output step (csrc/common/activation.h).
  m.def(
      "conv_forward(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, int groups, str activation=\"none\") -> Tensor");
  // Only the gradients selected by output_mask (input, weight, bias) are computed; the others
  // come back as empty tensors.
  m.def(
      "conv_backward(Tensor grad_output, Tensor input, Tensor weight, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Pooling, 1d/2d/3d (len(kernel_size) picks the dims; input is N x C x *spatial, the Python
  // layer adds and removes the batch dim of unbatched input). Indices are int64, flat within
  // each (n, c) plane as torch's: ((d * H) + h) * W + w.
  m.def(
      "max_pool_forward(Tensor input, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  m.def(
      "max_pool_backward(Tensor grad_output, Tensor input, Tensor indices, int[] kernel_size, "
      "int[] stride, int[] padding, int[] dilation, bool ceil_mode) -> Tensor");
  // divisor_override: 0 means none (torch rejects 0 in Python before it gets here).
  m.def(
      "avg_pool_forward(Tensor input, int[] kernel_size, int[] stride, int[] padding, "
      "bool ceil_mode, bool count_include_pad, int divisor_override) -> Tensor");
  m.def(
      "avg_pool_backward(Tensor grad_output, Tensor input, int[] kernel_size, int[] stride, "
      "int[] padding, bool ceil_mode, bool count_include_pad, int divisor_override) -> Tensor");
  // Adaptive pools: output_size is the spatial output (every entry resolved, no None).
  m.def("adaptive_avg_pool_forward(Tensor input, int[] output_size) -> Tensor");
  m.def("adaptive_avg_pool_backward(Tensor grad_output, Tensor input) -> Tensor");
  m.def("adaptive_max_pool_forward(Tensor input, int[] output_size) -> (Tensor, Tensor)");
  m.def("adaptive_max_pool_backward(Tensor grad_output, Tensor input, Tensor indices) -> Tensor");
  // Max unpool: output_size is the spatial output size (already resolved by the Python layer).
  m.def("max_unpool_forward(Tensor input, Tensor indices, int[] output_size) -> Tensor");
  m.def("max_unpool_backward(Tensor grad_output, Tensor input, Tensor indices) -> Tensor");

  // Normalization. Every forward returns (output, mean, invstd) of the statistics it normalized
  // with; every backward takes them back, with an output_mask for (input, weight, bias).
  // Batch norm over N x C x *: per-channel statistics. training=True normalizes with the batch
  // statistics and, when running stats are given, updates them in place
  // (running = (1 - momentum) * running + momentum * batch, with the unbiased variance).
  // training=False normalizes with the running statistics, which must then be given.
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // training=False: mean/invstd are constants (the running statistics), so grad_input is a
  // per-channel scale.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Layer norm over the trailing normalized_shape; mean/invstd have the leading shape.
  m.def(
      "layer_norm_forward(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor input, int[] normalized_shape, Tensor mean, "
      "Tensor invstd, Tensor? weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Group norm over N x C x *: statistics per (n, group), affine per channel; mean/invstd are
  // N x num_groups. Instance norm is group norm with num_groups = C.
  m.def(
      "group_norm_forward(Tensor input, Tensor? weight, Tensor? bias, int num_groups, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, int num_groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // SyncBatchNorm (cnnops.nn.SyncBatchNorm): the per-rank pieces; the ranks combine them with
  // torch.distributed in Python. Statistics are in the input's opmath dtype.
  // Per-channel mean and m2 = sum((x - mean)^2) over N x * (zeros for an empty batch).
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  // y = (x - mean) * invstd * weight + bias with given per-channel statistics.
  m.def("batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor");
  // Training grad_input of batch norm from given statistics and the per-channel sums sum(dy),
  // sum(dy * (x - mean)) over `count` values per channel (all ranks).
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, int count) -> Tensor");

  // Which CPU GEMM micro-kernel this process runs: "avx512", "avx2" or "portable" (benchmarks,
  // tests; CNNOPS_CPU_ISA caps it). cnnops._C.gemm_spec() gives its whole spec.
  m.def("cpu_gemm_isa() -> str");

  // The packed-weight cache of the CPU convolutions (csrc/cpu/weight_cache.h), off by default:
  // clear it, switch it on or off (returns the previous setting; cnnops.backends.cpu), and
  // [entries, bytes, hits, misses] for tests and benchmarks.
  m.def("cpu_weight_cache_clear() -> ()");
  m.def("cpu_weight_cache_enable(bool enabled) -> bool");
  m.def("cpu_weight_cache_info() -> int[]");
}
