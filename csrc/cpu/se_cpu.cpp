// The fused C++ CPU kernel and its registration as the CPU implementation of the se_fused ops:
// one pass over x for the squeeze, one for the rescale, multi-threaded with at::parallel_for,
// float32 (float64) accumulation, each sum taken in a fixed order (deterministic).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../se_binding.h"
#include "../se_math.h"

namespace se_fused {
namespace {

constexpr int64_t kChannelBlock = 64;     // channels a thread walks together in channels_last
constexpr int64_t kGrainElements = 32768;  // elements below which parallel_for stays on one thread

template <typename T>
using AccType = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Runs body(n, c0, c1) over (sample, channel block) pairs in parallel. Rows layout
// (positions innermost): blocks of one channel. Channels innermost (channels_last):
// blocks of kChannelBlock channels, walked position by position.
template <typename Body>
void parallel_channel_blocks(int64_t N, int64_t C, int64_t P, bool channels_inner, const Body& body) {
  const int64_t width = channels_inner ? kChannelBlock : 1;
  const int64_t blocks = (C + width - 1) / width;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (P * width));
  at::parallel_for(0, N * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = (i % blocks) * width;
      body(i / blocks, c0, std::min(C, c0 + width));
    }
  });
}

// out[n*C + c] = sum over p of a[n, c, p] (times b[n, c, p] when PRODUCT). Each sum is
// taken by one thread in a fixed order (deterministic); rows use 8 independent
// accumulators so the additions pipeline and vectorise.
template <bool PRODUCT, typename T, typename Acc>
void channel_sums(int64_t N, int64_t C, int64_t P, bool channels_inner, const T* a, Strides3 sa, const T* b,
                  Strides3 sb, Acc* out) {
  auto term = [](const T* pa, const T* pb, int64_t ia, int64_t ib) {
    if constexpr (PRODUCT) return static_cast<Acc>(pa[ia]) * static_cast<Acc>(pb[ib]);
    else return static_cast<Acc>(pa[ia]);
  };
  parallel_channel_blocks(N, C, P, channels_inner, [&](int64_t n, int64_t c0, int64_t c1) {
    if (!channels_inner) {
      const T* pa = a + n * sa.n + c0 * sa.c;
      const T* pb = b + n * sb.n + c0 * sb.c;
      Acc acc[8] = {};
      int64_t p = 0;
      if (sa.p == 1 && sb.p == 1) {
        for (; p + 8 <= P; p += 8)
          for (int k = 0; k < 8; ++k) acc[k] += term(pa, pb, p + k, p + k);
      }
      for (; p < P; ++p) acc[p % 8] += term(pa, pb, p * sa.p, p * sb.p);
      out[n * C + c0] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      return;
    }
    Acc acc[kChannelBlock] = {};
    for (int64_t p = 0; p < P; ++p) {
      const T* pa = a + n * sa.n + p * sa.p;
      const T* pb = b + n * sb.n + p * sb.p;
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += term(pa, pb, c * sa.c, c * sb.c);
    }
    for (int64_t c = c0; c < c1; ++c) out[n * C + c] = acc[c - c0];
  });
}

// dst[n, c, p] = src[n, c, p] * scale[n*C + c] (+ shift[n*C + c] when HAS_SHIFT).
template <bool HAS_SHIFT, typename T, typename Acc>
void scale_channels(int64_t N, int64_t C, int64_t P, bool channels_inner, const T* src, Strides3 ss, T* dst,
                    Strides3 sd, const Acc* scale, const Acc* shift) {
  auto apply = [&](T& out, T in, int64_t nc) {
    Acc v = static_cast<Acc>(in) * scale[nc];
    if constexpr (HAS_SHIFT) v += shift[nc];
    out = static_cast<T>(v);
  };
  parallel_channel_blocks(N, C, P, channels_inner, [&](int64_t n, int64_t c0, int64_t c1) {
    if (!channels_inner) {
      const T* ps = src + n * ss.n + c0 * ss.c;
      T* pd = dst + n * sd.n + c0 * sd.c;
      if (ss.p == 1 && sd.p == 1) {
        for (int64_t p = 0; p < P; ++p) apply(pd[p], ps[p], n * C + c0);
      } else {
        for (int64_t p = 0; p < P; ++p) apply(pd[p * sd.p], ps[p * ss.p], n * C + c0);
      }
      return;
    }
    for (int64_t p = 0; p < P; ++p) {
      const T* ps = src + n * ss.n + p * ss.p;
      T* pd = dst + n * sd.n + p * sd.p;
      for (int64_t c = c0; c < c1; ++c) apply(pd[c * sd.c], ps[c * ss.c], n * C + c);
    }
  });
}

template <typename T, typename PT>
void forward(const ForwardArgs& args) {
  using Acc = AccType<T>;
  const int64_t N = args.n, C = args.c, R = args.r, P = args.p;
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const PT* w1 = static_cast<const PT*>(args.w1);
  const PT* w2 = static_cast<const PT*>(args.w2);
  const PT* b1 = static_cast<const PT*>(args.b1);
  const PT* b2 = static_cast<const PT*>(args.b2);
  Acc* z = static_cast<Acc*>(args.z);
  Acc* a = static_cast<Acc*>(args.a);
  Acc* e = static_cast<Acc*>(args.e);
  const bool channels_inner = args.x_strides.c == 1 && args.x_strides.p != 1;

  channel_sums<false, T, Acc>(N, C, P, channels_inner, x, args.x_strides, x, args.x_strides, z);
  std::vector<Acc> scale(N * C);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> h(R);
    for (int64_t n = begin; n < end; ++n) {
      Acc* zn = z + n * C;
      for (int64_t c = 0; c < C; ++c) zn[c] /= static_cast<Acc>(P);
      for (int64_t r = 0; r < R; ++r) {
        Acc acc = b1 ? static_cast<Acc>(b1[r]) : Acc(0);
        for (int64_t c = 0; c < C; ++c) acc += static_cast<Acc>(w1[r * args.w1_stride_r + c * args.w1_stride_c]) * zn[c];
        a[n * R + r] = acc;
        h[r] = activation(acc, args.act);
      }
      for (int64_t c = 0; c < C; ++c) {
        Acc acc = b2 ? static_cast<Acc>(b2[c]) : Acc(0);
        for (int64_t r = 0; r < R; ++r) acc += static_cast<Acc>(w2[c * args.w2_stride_c + r * args.w2_stride_r]) * h[r];
        e[n * C + c] = acc;
        scale[n * C + c] = gate_fn(acc, args.gate);
      }
    }
  });
  scale_channels<false, T, Acc>(N, C, P, channels_inner, x, args.x_strides, y, args.y_strides, scale.data(),
                                nullptr);
}

template <typename T, typename PT>
void backward(const BackwardArgs& args) {
  using Acc = AccType<T>;
  const int64_t N = args.n, C = args.c, R = args.r, P = args.p;
  const T* g = static_cast<const T*>(args.grad_y);
  const T* x = static_cast<const T*>(args.x);
  const PT* w1 = static_cast<const PT*>(args.w1);
  const PT* w2 = static_cast<const PT*>(args.w2);
  const Acc* z = static_cast<const Acc*>(args.z);
  const Acc* a = static_cast<const Acc*>(args.a);
  const Acc* e = static_cast<const Acc*>(args.e);
  Acc* de = static_cast<Acc*>(args.de);
  Acc* da = static_cast<Acc*>(args.da);
  Acc* dzp = static_cast<Acc*>(args.dzp);
  const bool channels_inner = args.x_strides.c == 1 && args.x_strides.p != 1;

  // de holds ds = sum_p g*x until the MLP backward turns it into de
  channel_sums<true, T, Acc>(N, C, P, channels_inner, g, args.g_strides, x, args.x_strides, de);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      Acc* den = de + n * C;
      Acc* dan = da + n * R;
      Acc* dzn = dzp + n * C;
      // loops in the weights' memory order: w2 (C, R) and w1 (R, C) rows are contiguous
      std::fill(dan, dan + R, Acc(0));
      for (int64_t c = 0; c < C; ++c) {
        den[c] = gate_backward(den[c], e[n * C + c], args.gate);
        for (int64_t r = 0; r < R; ++r) dan[r] += static_cast<Acc>(w2[c * args.w2_stride_c + r * args.w2_stride_r]) * den[c];
      }
      for (int64_t r = 0; r < R; ++r) dan[r] = activation_backward(dan[r], a[n * R + r], args.act);
      std::fill(dzn, dzn + C, Acc(0));
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; ++c) dzn[c] += static_cast<Acc>(w1[r * args.w1_stride_r + c * args.w1_stride_c]) * dan[r];
      for (int64_t c = 0; c < C; ++c) dzn[c] /= static_cast<Acc>(P);
    }
  });
  if (args.dx) {
    std::vector<Acc> scale(N * C);
    for (int64_t i = 0; i < N * C; ++i) scale[i] = gate_fn(e[i], args.gate);
    scale_channels<true, T, Acc>(N, C, P, channels_inner, g, args.g_strides, static_cast<T*>(args.dx), args.dx_strides,
                           scale.data(), dzp);
  }
  if (!args.dw1) return;
  PT* dw1 = static_cast<PT*>(args.dw1);
  PT* dw2 = static_cast<PT*>(args.dw2);
  PT* db1 = static_cast<PT*>(args.db1);
  PT* db2 = static_cast<PT*>(args.db2);
  std::vector<Acc> h(N * R);
  for (int64_t i = 0; i < N * R; ++i) h[i] = activation(a[i], args.act);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc2(R), acc1(R);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(acc2.begin(), acc2.end(), Acc(0));
      std::fill(acc1.begin(), acc1.end(), Acc(0));
      for (int64_t n = 0; n < N; ++n) {  // n ascending for every element: deterministic
        const Acc de_nc = de[n * C + c], z_nc = z[n * C + c];
        for (int64_t r = 0; r < R; ++r) {
          acc2[r] += de_nc * h[n * R + r];
          acc1[r] += da[n * R + r] * z_nc;
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        dw2[c * args.dw2_stride_c + r * args.dw2_stride_r] = static_cast<PT>(acc2[r]);
        dw1[r * args.dw1_stride_r + c * args.dw1_stride_c] = static_cast<PT>(acc1[r]);
      }
      if (db2) {
        Acc acc = 0;
        for (int64_t n = 0; n < N; ++n) acc += de[n * C + c];
        db2[c] = static_cast<PT>(acc);
      }
    }
  });
  if (db1) {
    for (int64_t r = 0; r < R; ++r) {
      Acc acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += da[n * R + r];
      db1[r] = static_cast<PT>(acc);
    }
  }
}

// Calls fn.template operator()<T, PT>() for the supported (x dtype, parameter dtype) pairs.
template <template <typename, typename> class Kernel, typename Args>
void dispatch(const Args& args) {
  using c10::BFloat16;
  using c10::Half;
  const DType x = args.x_dtype, p = args.param_dtype;
  if (x == DType::kFloat && p == DType::kFloat) return Kernel<float, float>::run(args);
  if (x == DType::kDouble && p == DType::kDouble) return Kernel<double, double>::run(args);
  if (x == DType::kHalf && p == DType::kHalf) return Kernel<Half, Half>::run(args);
  if (x == DType::kHalf && p == DType::kFloat) return Kernel<Half, float>::run(args);
  if (x == DType::kBFloat16 && p == DType::kBFloat16) return Kernel<BFloat16, BFloat16>::run(args);
  if (x == DType::kBFloat16 && p == DType::kFloat) return Kernel<BFloat16, float>::run(args);
  throw std::invalid_argument("se_fused CPU kernel: unsupported (x dtype, parameter dtype) pair");
}

template <typename T, typename PT>
struct Forward {
  static void run(const ForwardArgs& args) { forward<T, PT>(args); }
};
template <typename T, typename PT>
struct Backward {
  static void run(const BackwardArgs& args) { backward<T, PT>(args); }
};

ForwardResult forward_cpu(const Tensor& x, const Tensor& fc1_weight, const c10::optional<Tensor>& fc1_bias,
                          const Tensor& fc2_weight, const c10::optional<Tensor>& fc2_bias, c10::string_view act,
                          c10::string_view gate) {
  const ForwardCall call = forward_call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate);
  if (call.args.n > 0) dispatch<Forward>(call.args);
  return call.result();
}

BackwardResult backward_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& fc1_weight,
                            const Tensor& fc2_weight, const Tensor& z, const Tensor& a, const Tensor& e,
                            c10::string_view act, c10::string_view gate, bool has_fc1_bias, bool has_fc2_bias,
                            bool need_dx, bool need_weight_grads) {
  const BackwardCall call = backward_call(grad_y, x, fc1_weight, fc2_weight, z, a, e, act, gate, has_fc1_bias,
                                          has_fc2_bias, need_dx, need_weight_grads);
  if (call.args.n > 0) dispatch<Backward>(call.args);
  return call.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(se_fused, CPU, m) {
  m.impl("se_forward", &forward_cpu);
  m.impl("se_backward", &backward_cpu);
}

}  // namespace se_fused
