// cnnops._C functions behind cnnops.backends (cnnops/backends.py): algorithm switches that the
// kernels read on every call.
#include <Python.h>

#include "cpu/conv_cpu.h"
#include "cpu/conv_first_layer.h"
#include "cpu/conv_nhwc.h"
#include "cpu/conv_grouped.h"
#include "cpu/conv_shifted.h"
#include "cpu/conv_small.h"
#include "cpu/conv_space_to_depth.h"
#include "cpu/conv_winograd.h"
#include "cpu/result_memory.h"

namespace cnnops::python {
namespace {

// Calls set(value) for a Python bool, else raises TypeError naming `what`.
PyObject* set_bool(PyObject* value, const char* what, void (*set)(bool)) {
  if (!PyBool_Check(value)) {
    PyErr_Format(PyExc_TypeError, "%sexpected a bool, got %s", what, Py_TYPE(value)->tp_name);
    return nullptr;
  }
  set(value == Py_True);
  Py_RETURN_NONE;
}

// _set_cpu_allow_winograd(bool)
PyObject* set_cpu_allow_winograd(PyObject* /*module*/, PyObject* value) {
  return set_bool(value, "allow_winograd: ", cnnops::cpu::set_winograd_allowed);
}

// _get_cpu_allow_winograd() -> bool
PyObject* get_cpu_allow_winograd(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(cnnops::cpu::winograd_allowed());
}

// _cpu_winograd_calls() -> int: convolutions that took the Winograd path (tests of the switch)
PyObject* cpu_winograd_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::winograd_call_count());
}

// _cpu_space_to_depth_calls() -> int: convolutions run through space to depth (tests)
PyObject* cpu_space_to_depth_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::space_to_depth_call_count());
}

// _cpu_grouped_direct_calls() -> int: kernel calls of the direct narrow-group path (tests)
PyObject* cpu_grouped_direct_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::grouped_direct_call_count());
}

// _cpu_first_layer_calls() -> int: kernel calls of the channels-last first-layer path (tests)
PyObject* cpu_first_layer_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::first_layer_call_count());
}

// _cpu_winograd_weight_calls() -> int: weight gradients that took the Winograd path
PyObject* cpu_winograd_weight_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::winograd_weight_call_count());
}

// _set_cpu_winograd_min_tiles(int): tests and benchmarks; see cpu/conv_winograd.h
PyObject* set_cpu_winograd_min_tiles(PyObject* /*module*/, PyObject* value) {
  const long long tiles = PyLong_AsLongLong(value);
  if (tiles == -1 && PyErr_Occurred()) return nullptr;
  cnnops::cpu::set_winograd_min_tiles(tiles < 0 ? -1 : tiles);
  Py_RETURN_NONE;
}

// _set_cpu_winograd_weight_streaming(int): tests and benchmarks; see cpu/conv_winograd.h
PyObject* set_cpu_winograd_weight_streaming(PyObject* /*module*/, PyObject* value) {
  const long long mode = PyLong_AsLongLong(value);
  if (mode == -1 && PyErr_Occurred()) return nullptr;
  cnnops::cpu::set_winograd_weight_streaming(mode < 0 ? -1 : mode > 0);
  Py_RETURN_NONE;
}

// _cpu_winograd_streamed_calls() -> int: Winograd forwards that made U slab by slab (tests)
PyObject* cpu_winograd_streamed_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::winograd_streamed_call_count());
}

// _set_cpu_winograd_tile(int): tests and benchmarks; see cpu/conv_winograd.h
PyObject* set_cpu_winograd_tile(PyObject* /*module*/, PyObject* value) {
  const long long m = PyLong_AsLongLong(value);
  if (m == -1 && PyErr_Occurred()) return nullptr;
  if (m != 0 && m != 2 && m != 4) {
    PyErr_Format(PyExc_ValueError, "_set_cpu_winograd_tile: expected 0, 2 or 4, got %lld", m);
    return nullptr;
  }
  cnnops::cpu::set_winograd_tile(m);
  Py_RETURN_NONE;
}

// _cpu_winograd_small_tile_calls() -> int: Winograd forwards that ran F(2x2, 3x3) (tests)
PyObject* cpu_winograd_small_tile_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::winograd_small_tile_call_count());
}

// _set_cpu_keep_result_memory(bool), _get_cpu_keep_result_memory() -> bool
PyObject* set_cpu_keep_result_memory(PyObject* /*module*/, PyObject* value) {
  return set_bool(value, "keep_result_memory: ", cnnops::cpu::set_result_memory_kept);
}
PyObject* get_cpu_keep_result_memory(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(cnnops::cpu::result_memory_kept());
}

// _cpu_release_result_memory(): cnnops.backends.cpu.empty_cache()
PyObject* cpu_release_result_memory(PyObject* /*module*/, PyObject* /*unused*/) {
  cnnops::cpu::release_result_memory();
  Py_RETURN_NONE;
}

// _cpu_result_memory_stats() -> (bytes held, byte limit, results that reused a block)
PyObject* cpu_result_memory_stats(PyObject* /*module*/, PyObject* /*unused*/) {
  return Py_BuildValue("(LLL)", static_cast<long long>(cnnops::cpu::result_memory_held_bytes()),
                       static_cast<long long>(cnnops::cpu::result_memory_limit_bytes()),
                       static_cast<long long>(cnnops::cpu::result_memory_reuse_count()));
}

// _set_cpu_result_memory_limit(int): tests; see cpu/result_memory.h
PyObject* set_cpu_result_memory_limit(PyObject* /*module*/, PyObject* value) {
  const long long bytes = PyLong_AsLongLong(value);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  cnnops::cpu::set_result_memory_limit(bytes < 0 ? -1 : bytes);
  Py_RETURN_NONE;
}

// _set_cpu_nhwc_kernels_forced(bool): tests; see cpu/conv_cpu.h
PyObject* set_cpu_nhwc_kernels_forced(PyObject* /*module*/, PyObject* value) {
  return set_bool(value, "", cnnops::cpu::set_nhwc_kernels_forced);
}

// _cpu_nhwc_kernel_calls() -> int: convolution calls that ran the channels-last kernels (tests)
PyObject* cpu_nhwc_kernel_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::nhwc_kernel_call_count());
}

// _cpu_nhwc_packed_forward_calls() -> int: NHWC forward calls that packed im2col rows (tests)
PyObject* cpu_nhwc_packed_forward_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::nhwc_packed_forward_count());
}

// _set_cpu_nhwc_row_segments(bool): tests; False runs the NHWC grid, packed and col2im paths instead
PyObject* set_cpu_nhwc_row_segments(PyObject* /*module*/, PyObject* value) {
  return set_bool(value, "", cnnops::cpu::set_nhwc_row_segments_enabled);
}

// _cpu_nhwc_row_segment_calls() -> int: NHWC forward calls run by the row-segment kernel (tests)
PyObject* cpu_nhwc_row_segment_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::nhwc_row_segment_forward_count());
}

// _cpu_nhwc_row_segment_own_fill_calls() -> int: of those, calls whose tasks filled their grid rows (tests)
PyObject* cpu_nhwc_row_segment_own_fill_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::nhwc_row_segment_own_fill_count());
}

// _cpu_nhwc_phase_grad_input_calls() -> int: NHWC strided grad inputs run by input phases (tests)
PyObject* cpu_nhwc_phase_grad_input_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::nhwc_phase_backward_input_count());
}

// _cpu_conv_forward_routes() -> dict[str, int]: calls of each CPU forward kernel (tests)
PyObject* cpu_conv_forward_routes(PyObject* /*module*/, PyObject* /*unused*/) {
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  for (const auto& [name, count] : cnnops::cpu::conv_forward_route_counts()) {
    PyObject* value = PyLong_FromLongLong(count);
    if (value == nullptr || PyDict_SetItemString(out, name.c_str(), value) < 0) {
      Py_XDECREF(value);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return out;
}

// _cpu_conv_weight_conversions() -> int: channels-last weights converted for a forward kernel (tests)
PyObject* cpu_conv_weight_conversions(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::conv_weight_conversion_count());
}

// _cpu_window_backward_calls() -> int: gradients computed by conv_small.cpp's window kernels (tests)
PyObject* cpu_window_backward_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::window_backward_call_count());
}

// _cpu_conv_weight_rows_calls() -> int: weight gradients computed as the transposed product (tests)
PyObject* cpu_conv_weight_rows_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::conv_weight_rows_call_count());
}

// _cpu_nhwc_weight_rows_calls() -> int: channels-last weight gradients computed as the transposed product (tests)
PyObject* cpu_nhwc_weight_rows_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::nhwc_weight_rows_count());
}

// _cpu_nhwc_weight_pointwise_calls() -> int: channels-last 1x1 weight gradients read in place (tests)
PyObject* cpu_nhwc_weight_pointwise_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::nhwc_weight_pointwise_count());
}

// _cpu_shifted_rows_calls() -> int: forward convolutions run as conv_forward_shifted_rows (tests)
PyObject* cpu_shifted_rows_calls(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(cnnops::cpu::shifted_rows_call_count());
}

PyMethodDef methods[] = {
    {"_set_cpu_allow_winograd", set_cpu_allow_winograd, METH_O, "cnnops.backends.cpu.allow_winograd setter"},
    {"_get_cpu_allow_winograd", get_cpu_allow_winograd, METH_NOARGS, "cnnops.backends.cpu.allow_winograd getter"},
    {"_cpu_winograd_calls", cpu_winograd_calls, METH_NOARGS, "number of convolutions run with Winograd"},
    {"_cpu_space_to_depth_calls", cpu_space_to_depth_calls, METH_NOARGS,
     "number of convolutions run through space to depth"},
    {"_cpu_grouped_direct_calls", cpu_grouped_direct_calls, METH_NOARGS,
     "number of kernel calls of the direct narrow-group convolution"},
    {"_cpu_first_layer_calls", cpu_first_layer_calls, METH_NOARGS,
     "number of kernel calls of the channels-last first-layer convolution"},
    {"_cpu_winograd_weight_calls", cpu_winograd_weight_calls, METH_NOARGS,
     "number of weight gradients run with Winograd"},
    {"_set_cpu_winograd_min_tiles", set_cpu_winograd_min_tiles, METH_O,
     "tests: n >= 0 takes Winograd for every eligible layer of at least n tiles; -1: the size rules"},
    {"_set_cpu_winograd_weight_streaming", set_cpu_winograd_weight_streaming, METH_O,
     "tests: 1 makes Winograd's U slab by slab inside the products, 0 all at once first, -1: the size rule"},
    {"_cpu_winograd_streamed_calls", cpu_winograd_streamed_calls, METH_NOARGS,
     "number of Winograd forwards that made U slab by slab"},
    {"_set_cpu_keep_result_memory", set_cpu_keep_result_memory, METH_O,
     "cnnops.backends.cpu.keep_result_memory setter"},
    {"_get_cpu_keep_result_memory", get_cpu_keep_result_memory, METH_NOARGS,
     "cnnops.backends.cpu.keep_result_memory getter"},
    {"_cpu_release_result_memory", cpu_release_result_memory, METH_NOARGS, "cnnops.backends.cpu.empty_cache()"},
    {"_cpu_result_memory_stats", cpu_result_memory_stats, METH_NOARGS,
     "(bytes the result pool holds, its limit, results that reused a block)"},
    {"_set_cpu_result_memory_limit", set_cpu_result_memory_limit, METH_O,
     "tests: bytes >= 0 replaces the result pool's limit, -1 restores it"},
    {"_set_cpu_winograd_tile", set_cpu_winograd_tile, METH_O,
     "tests: 2 or 4 runs every Winograd forward with F(m x m, 3x3); 0: the size rules choose"},
    {"_cpu_winograd_small_tile_calls", cpu_winograd_small_tile_calls, METH_NOARGS,
     "number of Winograd forwards that ran F(2x2, 3x3)"},
    {"_set_cpu_nhwc_kernels_forced", set_cpu_nhwc_kernels_forced, METH_O,
     "tests: True runs the channels-last kernels wherever they serve, past the speed rules"},
    {"_cpu_nhwc_kernel_calls", cpu_nhwc_kernel_calls, METH_NOARGS,
     "number of convolution calls that ran the channels-last kernels"},
    {"_cpu_nhwc_packed_forward_calls", cpu_nhwc_packed_forward_calls, METH_NOARGS,
     "number of channels-last forward calls that packed their im2col rows (not the phase grid)"},
    {"_set_cpu_nhwc_row_segments", set_cpu_nhwc_row_segments, METH_O,
     "tests: False runs the channels-last grid, packed and col2im kernels instead of the row segments"},
    {"_cpu_nhwc_row_segment_calls", cpu_nhwc_row_segment_calls, METH_NOARGS,
     "number of channels-last forward calls run by the row-segment kernel (only real output rows)"},
    {"_cpu_nhwc_row_segment_own_fill_calls", cpu_nhwc_row_segment_own_fill_calls, METH_NOARGS,
     "number of row-segment forward calls whose tasks filled the phase-grid rows they read"},
    {"_cpu_nhwc_phase_grad_input_calls", cpu_nhwc_phase_grad_input_calls, METH_NOARGS,
     "number of strided channels-last grad inputs run by input phases (no col2im)"},
    {"_cpu_conv_forward_routes", cpu_conv_forward_routes, METH_NOARGS,
     "calls of each CPU convolution forward kernel, by route name"},
    {"_cpu_window_backward_calls", cpu_window_backward_calls, METH_NOARGS,
     "number of convolution gradients computed by the whole-window kernels"},
    {"_cpu_conv_weight_conversions", cpu_conv_weight_conversions, METH_NOARGS,
     "number of channels-last weights a CPU convolution forward converted to OIHW"},
    {"_cpu_conv_weight_rows_calls", cpu_conv_weight_rows_calls, METH_NOARGS,
     "number of CPU weight gradients computed as im2col(X) * dY^T (few output channels)"},
    {"_cpu_nhwc_weight_rows_calls", cpu_nhwc_weight_rows_calls, METH_NOARGS,
     "number of CPU channels-last weight gradients computed as im2col^T * dY (few output channels)"},
    {"_cpu_nhwc_weight_pointwise_calls", cpu_nhwc_weight_pointwise_calls, METH_NOARGS,
     "number of CPU channels-last 1x1 weight gradients computed with dY and X read in place"},
    {"_cpu_shifted_rows_calls", cpu_shifted_rows_calls, METH_NOARGS,
     "number of CPU stride-1 forward convolutions run with the product transposed (few output channels)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* backend_methods() { return methods; }

}  // namespace cnnops::python
