// The SE activation and gate functions and their derivatives, for CPU and CUDA code.
#pragma once

#include <cmath>

#include "se_params.h"

#if defined(__CUDACC__)
#define SE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SE_HOST_DEVICE inline
#endif

namespace se_fused {

template <typename T>
SE_HOST_DEVICE T sigmoid(T v) {
  using std::exp;  // the float overload for float, on host and device
  return T(1) / (T(1) + exp(-v));
}

template <typename T>
SE_HOST_DEVICE T activation(T a, Act act) {
  return act == Act::kRelu ? (a < T(0) ? T(0) : a) : a * sigmoid(a);  // not max(a, 0): NaN propagates
}

// grad · act'(a), as eager PyTorch computes it: ReLU's is a select (threshold_backward), so a NaN or
// Inf gradient of a dead unit gives 0 and a NaN a passes the gradient on.
template <typename T>
SE_HOST_DEVICE T activation_backward(T grad, T a, Act act) {
  if (act == Act::kRelu) return a <= T(0) ? T(0) : grad;
  const T sig = sigmoid(a);
  return grad * (sig * (T(1) + a * (T(1) - sig)));
}

template <typename T>
SE_HOST_DEVICE T gate_fn(T e, Gate gate) {
  if (gate == Gate::kSigmoid) return sigmoid(e);
  // relu6(e + 3) / 6: the same rounding as torch's hardsigmoid
  const T t = e + T(3);
  return (t < T(0) ? T(0) : (t > T(6) ? T(6) : t)) / T(6);
}

// grad · gate'(e), as eager PyTorch computes it: hard sigmoid's is a select (hardsigmoid_backward).
template <typename T>
SE_HOST_DEVICE T gate_backward(T grad, T e, Gate gate) {
  if (gate == Gate::kSigmoid) {
    const T s = sigmoid(e);
    return grad * (s * (T(1) - s));
  }
  return (e > T(-3) && e < T(3)) ? grad / T(6) : T(0);
}

// out_act of the fused residual tail, y = out_act(x · s + residual), as eager computes it: ReLU as
// clamp_min (NaN propagates), SiLU as t / (1 + exp(-t)).
template <typename T>
SE_HOST_DEVICE T out_activation(T v, OutAct out_act) {
  using std::exp;
  if (out_act == OutAct::kRelu) return v < T(0) ? T(0) : v;
  if (out_act == OutAct::kSilu) return v / (T(1) + exp(-v));
  return v;
}

// grad · out_act'(u), the gradient at the tail's input: u is y for ReLU (threshold_backward on the
// output, as eager's ReLU does: a select, so a NaN y passes the gradient on) and the activation's
// input x · s + residual for SiLU.
template <typename T>
SE_HOST_DEVICE T out_activation_backward(T grad, T u, OutAct out_act) {
  if (out_act == OutAct::kRelu) return u <= T(0) ? T(0) : grad;
  if (out_act == OutAct::kSilu) {
    const T sig = sigmoid(u);
    return grad * (sig * (T(1) + u * (T(1) - sig)));
  }
  return grad;
}

}  // namespace se_fused
