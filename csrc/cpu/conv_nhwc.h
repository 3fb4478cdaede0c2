#pragma once
// conv_nhwc.cpp's row-segment kernels: the rule conv.cpp's layout choice asks, a switch and call
// counters for the tests (cnnops._C).
#include <cstdint>

#include "common/conv_shape.h"

namespace cnnops {
namespace cpu {

// Whether conv_forward_nhwc runs this geometry on the row-segment kernel (real output rows only).
bool nhwc_row_segments_serve(const ConvGeometry& g);
// Tests: off, the NHWC kernels take the grid, packed and col2im paths as before the segments.
void set_nhwc_row_segments_enabled(bool on);
// Channels-last forward calls run by the row-segment kernel (conv_forward_nhwc_rows).
int64_t nhwc_row_segment_forward_count();
// Of those, calls whose tasks filled the phase-grid rows they read (2-d stride 2, row_tasks_fill_grid).
int64_t nhwc_row_segment_own_fill_count();
// Strided channels-last grad inputs run by input phases (conv_backward_input_nhwc_phases).
int64_t nhwc_phase_backward_input_count();

}  // namespace cpu
}  // namespace cnnops
