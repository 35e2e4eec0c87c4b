// Plain description of one SE problem, shared by the CPU and CUDA kernels and the
// torch binding. No torch or CUDA types: kernel files compile without torch headers.
#pragma once

#include <cstdint>

namespace se_fused {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };
enum class Act : int { kRelu = 0, kSilu = 1 };
enum class Gate : int { kSigmoid = 0, kHardSigmoid = 1 };

// Element offsets of a (N, C, P) view, P = H*W flattened.
struct Strides3 {
  int64_t n, c, p;
};

// x: (N, C, P); w1: (R, C); w2: (C, R). z, a, e (saved for backward) are in the
// compute dtype: double for double input, float otherwise.
struct ForwardArgs {
  const void* x;
  void* y;
  const void* w1;
  const void* b1;  // may be null
  const void* w2;
  const void* b2;  // may be null
  void* z;         // (N, C) mean over P
  void* a;         // (N, R) fc1 output before the activation
  void* e;         // (N, C) fc2 output before the gate
  int64_t n, c, r, p;
  Strides3 x_strides, y_strides;
  int64_t w1_stride_r, w1_stride_c, w2_stride_c, w2_stride_r;
  DType x_dtype, param_dtype;
  Act act;
  Gate gate;
};

struct BackwardArgs {
  const void* grad_y;
  const void* x;
  void* dx;  // null: not needed
  const void* w1;
  const void* w2;
  const void* z;
  const void* a;
  const void* e;
  void* dw1;  // (R, C), parameter dtype; null: weight grads not needed
  void* db1;  // may be null
  void* dw2;  // (C, R)
  void* db2;  // may be null
  void* de;   // (N, C) compute dtype scratch: dL/de
  void* da;   // (N, R) compute dtype scratch: dL/da
  void* dzp;  // (N, C) compute dtype scratch: dL/dz / P
  int64_t n, c, r, p;
  Strides3 g_strides, x_strides, dx_strides;
  int64_t w1_stride_r, w1_stride_c, w2_stride_c, w2_stride_r;
  int64_t dw1_stride_r, dw1_stride_c, dw2_stride_c, dw2_stride_r;
  DType x_dtype, param_dtype;
  Act act;
  Gate gate;
};

}  // namespace se_fused
