// Every cnnops schema, in one place. Kernels register under CPU (csrc/cpu) and CUDA
// (csrc/cuda); fake implementations for tracing live in cnnops/_ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import cnnops._C` only has to load this library: the ops register through TORCH_LIBRARY.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cnnops, m) {
  // Convolution, 1d/2d/3d (weight rank picks the dims). Symmetric zero padding; the Python
  // layer pads asymmetric 'same' and non-zero padding modes first, as torch does.
  m.def("conv_forward(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
  // Only the gradients selected by output_mask (input, weight, bias) are computed; the others
  // come back as empty tensors.
  m.def("conv_backward(Tensor grad_output, Tensor input, Tensor weight, int[] stride, "
        "int[] padding, int[] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
