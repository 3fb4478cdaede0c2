// CPU kernels of the normalization ops (schemas in csrc/ops.cpp): batch norm
// (batch_norm.cpp), layer norm (layer_norm.cpp), group and instance norm (group_norm.cpp),
// built on the vectorized loops of norm_kernels.cpp.
#include <torch/library.h>

#include "cpu/norm_cpu.h"

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("batch_norm_forward", &cnnops::cpu::batch_norm_forward);
  m.impl("batch_norm_backward", &cnnops::cpu::batch_norm_backward);
  m.impl("layer_norm_forward", &cnnops::cpu::layer_norm_forward);
  m.impl("layer_norm_backward", &cnnops::cpu::layer_norm_backward);
  m.impl("group_norm_forward", &cnnops::cpu::group_norm_forward);
  m.impl("group_norm_backward", &cnnops::cpu::group_norm_backward);
  // SyncBatchNorm pieces
  m.impl("batch_norm_stats", &cnnops::cpu::batch_norm_stats);
  m.impl("batch_norm_elemt", &cnnops::cpu::batch_norm_elemt);
  m.impl("batch_norm_backward_elemt", &cnnops::cpu::batch_norm_backward_elemt);
}
