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

}  // namespace se_fused
