// The torch binding: one op schema registered with TORCH_LIBRARY, argument checks
// that name the argument, and the CPU and CUDA implementations. Kernels live in
// cpu/ and cuda/ and see only plain structs (se_params.h).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <tuple>

#include "cpu/se_cpu.h"
#include "se_params.h"

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>

#include "cuda/se_cuda.h"
#endif

extern "C" {
// `import se_fused._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace se_fused {
namespace {

using at::Tensor;

// R accumulators live in dynamic shared memory; with up to 8 KiB of static shared memory beside
// them, 32 KiB keeps a block under the 48 KiB available without opt-in.
constexpr int64_t kMaxSharedAccumulatorBytes = 32 * 1024;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK_TYPE(false, "se_fused: unsupported dtype ", t);
  }
}

at::ScalarType compute_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Act parse_act(c10::string_view act) {
  if (act == "relu") return Act::kRelu;
  if (act == "silu") return Act::kSilu;
  TORCH_CHECK_VALUE(false, "se_fused: act must be 'relu' or 'silu', got '", std::string(act), "'");
}

Gate parse_gate(c10::string_view gate) {
  if (gate == "sigmoid") return Gate::kSigmoid;
  if (gate == "hard_sigmoid") return Gate::kHardSigmoid;
  TORCH_CHECK_VALUE(false, "se_fused: gate must be 'sigmoid' or 'hard_sigmoid', got '", std::string(gate), "'");
}

// (stride_n, stride_c, stride_p) when H and W flatten into one position axis.
bool spatial_strides(const Tensor& t, Strides3* out) {
  const int64_t h = t.size(2), w = t.size(3);
  const int64_t sh = t.stride(2), sw = t.stride(3);
  if (w == 1) *out = {t.stride(0), t.stride(1), sh};
  else if (h == 1 || sh == w * sw) *out = {t.stride(0), t.stride(1), sw};
  else return false;
  return true;
}

Strides3 checked_spatial_strides(const Tensor& t, const char* name) {
  Strides3 s;
  TORCH_CHECK_VALUE(spatial_strides(t, &s), "se_fused: ", name, " must have H and W flattenable into one axis "
                    "(NCHW-contiguous or channels_last), got strides ", t.strides(), "; call .contiguous() first");
  return s;
}

void check_same_device(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "se_fused: ", name, " is on ", t.device(), " but x is on ", x.device(),
                    "; all tensors must share a device");
}

void check_param_dtype(const Tensor& t, const char* name, const Tensor& x, const Tensor& fc1_weight) {
  const bool half_x = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const bool allowed = t.scalar_type() == x.scalar_type() || (half_x && t.scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(allowed && t.scalar_type() == fc1_weight.scalar_type(), "se_fused: ", name, " has dtype ",
                   t.scalar_type(), "; parameters must share one dtype, x's (", x.scalar_type(), ")",
                   half_x ? " or float32" : "");
}

void check_vector(const Tensor& t, const char* name, const Tensor& x, int64_t rows, int64_t cols) {
  check_same_device(t, name, x);
  TORCH_CHECK_TYPE(t.scalar_type() == compute_dtype(x), "se_fused: ", name, " must be ", compute_dtype(x),
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous(), "se_fused: ",
                    name, " must be a contiguous (", rows, ", ", cols, ") tensor, got ", t.sizes());
}

// Checks x and the parameters; returns R.
int64_t check_inputs(const Tensor& x, const Tensor& w1, const c10::optional<Tensor>& b1, const Tensor& w2,
                     const c10::optional<Tensor>& b2) {
  TORCH_CHECK_VALUE(x.dim() == 4, "se_fused: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "se_fused: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  const int64_t c = x.size(1);
  TORCH_CHECK_VALUE(c > 0 && x.size(2) * x.size(3) > 0, "se_fused: x must have at least one channel and one "
                    "spatial position, got shape ", x.sizes());
  TORCH_CHECK_VALUE(w1.dim() == 2, "se_fused: fc1_weight must be 2-D (R, C), got ", w1.dim(), "-D");
  const int64_t r = w1.size(0);
  TORCH_CHECK_VALUE(r > 0 && w1.size(1) == c, "se_fused: fc1_weight must have shape (R, ", c, ") for x with ", c,
                    " channels, got ", w1.sizes());
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == c && w2.size(1) == r, "se_fused: fc2_weight must have shape (",
                    c, ", ", r, "), got ", w2.sizes());
  check_same_device(w1, "fc1_weight", x);
  check_same_device(w2, "fc2_weight", x);
  check_param_dtype(w1, "fc1_weight", x, w1);
  check_param_dtype(w2, "fc2_weight", x, w1);
  if (b1) {
    TORCH_CHECK_VALUE(b1->dim() == 1 && b1->size(0) == r, "se_fused: fc1_bias must have shape (", r, "), got ",
                      b1->sizes());
    check_same_device(*b1, "fc1_bias", x);
    check_param_dtype(*b1, "fc1_bias", x, w1);
  }
  if (b2) {
    TORCH_CHECK_VALUE(b2->dim() == 1 && b2->size(0) == c, "se_fused: fc2_bias must have shape (", c, "), got ",
                      b2->sizes());
    check_same_device(*b2, "fc2_bias", x);
    check_param_dtype(*b2, "fc2_bias", x, w1);
  }
  return r;
}

#ifdef WITH_CUDA
// Self-resetting counters (zero between launches) of one (device, stream).
Tensor cuda_sync_workspace(const Tensor& x, int64_t n) {
  static std::mutex mutex;
  // Never destroyed: freeing CUDA memory from a static destructor can outlive the CUDA context.
  static auto* workspaces = new std::map<std::pair<int, cudaStream_t>, Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& ws = (*workspaces)[{x.get_device(), at::cuda::getCurrentCUDAStream().stream()}];
  if (!ws.defined() || ws.numel() < 1 + 2 * n) {
    // Zeroed once here; afterwards the kernels leave every counter at zero.
    ws = at::zeros({1 + 2 * std::max<int64_t>(n, ws.defined() ? ws.numel() : 0)}, x.options().dtype(at::kInt));
  }
  return ws;
}

CudaSchedule cuda_schedule(const Tensor& x, const Strides3& s) {
  // Tests force either regime with SE_FUSED_CUDA_SPLIT=0/1: both must stay correct on every shape.
  const char* force = std::getenv("SE_FUSED_CUDA_SPLIT");
  return plan_cuda_schedule(x.size(0), x.size(1), x.size(2) * x.size(3), s.c == 1 && s.p != 1,
                            static_cast<int>(x.element_size()),
                            at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                            force ? (force[0] == '1' ? 1 : 0) : -1);
}

void check_cuda_limits(const Tensor& x, int64_t r) {
  const int64_t bytes = r * (compute_dtype(x) == at::kDouble ? 8 : 4);
  TORCH_CHECK_VALUE(bytes <= kMaxSharedAccumulatorBytes, "se_fused: the CUDA kernels hold R = ", r,
                    " hidden units in shared memory; at most ", kMaxSharedAccumulatorBytes / (bytes / r),
                    " are supported for ", x.scalar_type(), " (use backend='triton')");
}
#endif

ForwardArgs forward_args(const Tensor& x, const Tensor& w1, const c10::optional<Tensor>& b1, const Tensor& w2,
                         const c10::optional<Tensor>& b2, Strides3 x_strides, Act act, Gate gate,
                         const Tensor& y, const Tensor& z, const Tensor& a, const Tensor& e) {
  ForwardArgs args{};
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.w1 = w1.data_ptr();
  args.b1 = b1 ? b1->data_ptr() : nullptr;
  args.w2 = w2.data_ptr();
  args.b2 = b2 ? b2->data_ptr() : nullptr;
  args.z = z.data_ptr();
  args.a = a.data_ptr();
  args.e = e.data_ptr();
  args.n = x.size(0);
  args.c = x.size(1);
  args.r = w1.size(0);
  args.p = x.size(2) * x.size(3);
  args.x_strides = x_strides;
  args.y_strides = checked_spatial_strides(y, "y");
  args.w1_stride_r = w1.stride(0);
  args.w1_stride_c = w1.stride(1);
  args.w2_stride_c = w2.stride(0);
  args.w2_stride_r = w2.stride(1);
  args.x_dtype = to_dtype(x.scalar_type());
  args.param_dtype = to_dtype(w1.scalar_type());
  args.act = act;
  args.gate = gate;
  return args;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> se_forward(const Tensor& x, const Tensor& fc1_weight,
                                                      const c10::optional<Tensor>& fc1_bias,
                                                      const Tensor& fc2_weight,
                                                      const c10::optional<Tensor>& fc2_bias, c10::string_view act,
                                                      c10::string_view gate) {
  const int64_t r = check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  // every argument is checked before anything is allocated or launched
  const Strides3 x_strides = checked_spatial_strides(x, "x");
  const Act act_kind = parse_act(act);
  const Gate gate_kind = parse_gate(gate);
  const int64_t n = x.size(0), c = x.size(1);
  Tensor y = at::empty_like(x);
  const auto vec = x.options().dtype(compute_dtype(x));
  Tensor z = at::empty({n, c}, vec), a = at::empty({n, r}, vec), e = at::empty({n, c}, vec);
  if (n == 0) return {y, z, a, e};
  const ForwardArgs args =
      forward_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x_strides, act_kind, gate_kind, y, z, a, e);
  if (x.is_cpu()) {
    se_forward_cpu(args);
    return {y, z, a, e};
  }
#ifdef WITH_CUDA
  check_cuda_limits(x, r);
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaSchedule plan = cuda_schedule(x, args.x_strides);
  Tensor sync = cuda_sync_workspace(x, n);
  Tensor partial = at::empty({n * plan.num_segments * c}, vec);
  const cudaError_t err = se_forward_cuda(args, plan, sync.data_ptr<int>(), partial.data_ptr(),
                                          at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "se_fused: CUDA forward launch failed: ", cudaGetErrorString(err));
  return {y, z, a, e};
#else
  TORCH_CHECK(false, "se_fused: built without CUDA kernels");
#endif
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> se_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& fc1_weight, const Tensor& fc2_weight, const Tensor& z,
    const Tensor& a, const Tensor& e, c10::string_view act, c10::string_view gate, bool has_fc1_bias,
    bool has_fc2_bias, bool need_dx, bool need_weight_grads) {
  const int64_t r = check_inputs(x, fc1_weight, c10::nullopt, fc2_weight, c10::nullopt);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "se_fused: grad_y must have x's shape ", x.sizes(), ", got ",
                    grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "se_fused: grad_y must have x's dtype ",
                   x.scalar_type(), ", got ", grad_y.scalar_type());
  check_same_device(grad_y, "grad_y", x);
  const int64_t n = x.size(0), c = x.size(1);
  check_vector(z, "z", x, n, c);
  check_vector(a, "a", x, n, r);
  check_vector(e, "e", x, n, c);
  const Strides3 x_strides = checked_spatial_strides(x, "x");
  Strides3 g_strides;
  const Tensor g = spatial_strides(grad_y, &g_strides) ? grad_y : grad_y.contiguous(x.suggest_memory_format());
  g_strides = checked_spatial_strides(g, "grad_y");

  const auto vec = x.options().dtype(compute_dtype(x));
  const auto param = fc1_weight.options();
  Tensor dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor dw1 = need_weight_grads ? at::empty({r, c}, param) : at::empty({0}, param);
  Tensor dw2 = need_weight_grads ? at::empty({c, r}, param) : at::empty({0}, param);
  Tensor db1 = need_weight_grads && has_fc1_bias ? at::empty({r}, param) : at::empty({0}, param);
  Tensor db2 = need_weight_grads && has_fc2_bias ? at::empty({c}, param) : at::empty({0}, param);
  if (n == 0) {
    if (need_weight_grads) {  // a sum over an empty batch
      dw1.zero_(), dw2.zero_(), db1.zero_(), db2.zero_();
    }
    return {dx, dw1, db1, dw2, db2};
  }
  Tensor de = at::empty({n, c}, vec), da = at::empty({n, r}, vec), dzp = at::empty({n, c}, vec);

  BackwardArgs args{};
  args.grad_y = g.data_ptr();
  args.x = x.data_ptr();
  args.dx = need_dx ? dx.data_ptr() : nullptr;
  args.w1 = fc1_weight.data_ptr();
  args.w2 = fc2_weight.data_ptr();
  args.z = z.data_ptr();
  args.a = a.data_ptr();
  args.e = e.data_ptr();
  args.dw1 = need_weight_grads ? dw1.data_ptr() : nullptr;
  args.dw2 = need_weight_grads ? dw2.data_ptr() : nullptr;
  args.db1 = db1.numel() ? db1.data_ptr() : nullptr;
  args.db2 = db2.numel() ? db2.data_ptr() : nullptr;
  args.de = de.data_ptr();
  args.da = da.data_ptr();
  args.dzp = dzp.data_ptr();
  args.n = n;
  args.c = c;
  args.r = r;
  args.p = x.size(2) * x.size(3);
  args.g_strides = g_strides;
  args.x_strides = x_strides;
  args.dx_strides = need_dx ? checked_spatial_strides(dx, "dx") : x_strides;
  args.w1_stride_r = fc1_weight.stride(0);
  args.w1_stride_c = fc1_weight.stride(1);
  args.w2_stride_c = fc2_weight.stride(0);
  args.w2_stride_r = fc2_weight.stride(1);
  args.dw1_stride_r = c;
  args.dw1_stride_c = 1;
  args.dw2_stride_c = r;
  args.dw2_stride_r = 1;
  args.x_dtype = to_dtype(x.scalar_type());
  args.param_dtype = to_dtype(fc1_weight.scalar_type());
  args.act = parse_act(act);
  args.gate = parse_gate(gate);
  if (x.is_cpu()) {
    se_backward_cpu(args);
    return {dx, dw1, db1, dw2, db2};
  }
#ifdef WITH_CUDA
  check_cuda_limits(x, r);
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaSchedule plan = cuda_schedule(x, x_strides);
  Tensor sync = cuda_sync_workspace(x, n);
  Tensor partial = at::empty({n * plan.num_segments * c}, vec);
  const cudaError_t err = se_backward_cuda(args, plan, sync.data_ptr<int>(), partial.data_ptr(),
                                           at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "se_fused: CUDA backward launch failed: ", cudaGetErrorString(err));
  return {dx, dw1, db1, dw2, db2};
#else
  TORCH_CHECK(false, "se_fused: built without CUDA kernels");
#endif
}

}  // namespace

TORCH_LIBRARY(se_fused, m) {
  m.def("se_forward(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "str act, str gate) -> (Tensor y, Tensor z, Tensor a, Tensor e)");
  m.def("se_backward(Tensor grad_y, Tensor x, Tensor fc1_weight, Tensor fc2_weight, Tensor z, Tensor a, "
        "Tensor e, str act, str gate, bool has_fc1_bias, bool has_fc2_bias, bool need_dx, "
        "bool need_weight_grads) -> (Tensor dx, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2)");
}

TORCH_LIBRARY_IMPL(se_fused, CPU, m) {
  m.impl("se_forward", &se_forward);
  m.impl("se_backward", &se_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(se_fused, CUDA, m) {
  m.impl("se_forward", &se_forward);
  m.impl("se_backward", &se_backward);
}
#endif

}  // namespace se_fused
