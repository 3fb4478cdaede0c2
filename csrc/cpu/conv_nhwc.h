#pragma once
// Call counters of conv_nhwc.cpp's row-segment kernels, for the tests (cnnops._C).
#include <cstdint>

namespace cnnops {
namespace cpu {

// Channels-last forward calls run by the row-segment kernel (conv_forward_nhwc_rows).
int64_t nhwc_row_segment_forward_count();
// Strided channels-last grad inputs run by input phases (conv_backward_input_nhwc_phases).
int64_t nhwc_phase_backward_input_count();

}  // namespace cpu
}  // namespace cnnops
