// Plain description of one SE problem, shared by the CPU and CUDA kernels and the
// torch binding. No torch or CUDA types: kernel files compile without torch headers.
#pragma once

#include <cstdint>

namespace se_fused {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };
enum class Act : int { kRelu = 0, kSilu = 1 };
enum class Gate : int { kSigmoid = 0, kHardSigmoid = 1 };
// The activation of the fused residual tail, y = out_act(x * s + residual).
enum class OutAct : int { kNone = 0, kRelu = 1, kSilu = 2 };

// Element offsets of a (N, C, P) view, P = H*W flattened.
struct Strides3 {
  int64_t n, c, p;
};

// x: (N, C, P); w1: (R, C); w2: (C, R). z, a, e (saved for backward) are in the
// compute dtype: double for double input, float otherwise. y = out_act(x * s + residual).
struct ForwardArgs {
  const void* x;
  const void* residual;  // may be null
  void* y;
  const void* w1;
  const void* b1;  // may be null
  const void* w2;
  const void* b2;  // may be null
  void* z;         // (N, C) mean over P
  void* a;         // (N, R) fc1 output before the activation
  void* e;         // (N, C) fc2 output before the gate
  int64_t n, c, r, p;
  Strides3 x_strides, residual_strides, y_strides;
  int64_t w1_stride_r, w1_stride_c, w2_stride_c, w2_stride_r;
  DType x_dtype, param_dtype;
  Act act;
  Gate gate;
  OutAct out_act;
};

// With a tail (out_act not kNone) the gradient at out_act's input, dt = grad_y * out_act'(.),
// replaces grad_y: it comes from y's sign (ReLU) or from x * s + residual (SiLU), and is
// written to d_residual when that is asked for.
struct BackwardArgs {
  const void* grad_y;
  const void* x;
  const void* y;         // out_act kRelu: the forward's output
  const void* residual;  // out_act kSilu: the forward's residual (may be null)
  void* d_residual;      // null: not needed (or out_act kNone, where it is grad_y)
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
  Strides3 g_strides, x_strides, y_strides, residual_strides, d_residual_strides, dx_strides;
  int64_t w1_stride_r, w1_stride_c, w2_stride_c, w2_stride_r;
  int64_t dw1_stride_r, dw1_stride_c, dw2_stride_c, dw2_stride_r;
  DType x_dtype, param_dtype;
  Act act;
  Gate gate;
  OutAct out_act;
};

}  // namespace se_fused
