// The torch binding: the op schema (TORCH_LIBRARY), argument checks that name the argument,
// output allocation and the packing of the plain structs the kernels read (se_binding.h).
// The device implementations register themselves beside their kernels: cpu/se_cpu.cpp (CPU)
// and cuda/se_cuda_ops.cpp (CUDA). No pybind: `import se_fused._C` loads this library, which
// runs the registrations, and PyInit__C adds the few switches tests set from Python.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <mutex>
#include <string>

#include "se_binding.h"

namespace se_fused {
namespace {

std::atomic<bool> poison{false};

std::mutex forced_mutex;
ForcedSchedule forced;

std::string& cuda_arch_list() {  // a function-local static: set during static initialisation
  static std::string archs;
  return archs;
}
bool& cuda_linked() {
  static bool linked = false;
  return linked;
}
CudaScheduleDescriber& cuda_schedule_describer() {
  static CudaScheduleDescriber describe = nullptr;
  return describe;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: TORCH_INTERNAL_ASSERT(false, "se_fused: unchecked dtype ", t);
  }
}

// Messages match se_fused/spec.py's check_inputs word for word (Python spelling of shapes and
// dtypes), so every backend reports bad input the same way.
std::string py_shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

Act parse_act(c10::string_view act) {
  if (act == "relu") return Act::kRelu;
  if (act == "silu") return Act::kSilu;
  TORCH_CHECK_VALUE(false, "act must be one of 'relu', 'silu', got '", std::string(act), "'");
}

Gate parse_gate(c10::string_view gate) {
  if (gate == "sigmoid") return Gate::kSigmoid;
  if (gate == "hard_sigmoid") return Gate::kHardSigmoid;
  TORCH_CHECK_VALUE(false, "gate must be one of 'sigmoid', 'hard_sigmoid', got '", std::string(gate), "'");
}

OutAct parse_out_act(c10::string_view out_act) {
  if (out_act == "none") return OutAct::kNone;
  if (out_act == "relu") return OutAct::kRelu;
  if (out_act == "silu") return OutAct::kSilu;
  TORCH_CHECK_VALUE(false, "out_act must be one of 'none', 'relu', 'silu', got '", std::string(out_act), "'");
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

// t itself when H and W flatten into one axis (no copy for NCHW, channels_last and more), else a copy.
Tensor flattenable(const Tensor& t, at::MemoryFormat format) {
  Strides3 s;
  return spatial_strides(t, &s) ? t : t.contiguous(format);
}

Strides3 strides_of(const Tensor& t) {
  Strides3 s;
  TORCH_INTERNAL_ASSERT(spatial_strides(t, &s), "se_fused: an output lost its flattenable strides");
  return s;
}

void check_dims(const Tensor& t, const char* name, int64_t a, int64_t b = -1) {
  TORCH_CHECK_VALUE(t.dim() == a || t.dim() == b, name, " must have ", a, b > 0 ? " or " + std::to_string(b) : "",
                    " dimensions, got shape ", py_shape(t.sizes()));
}

void check_weight(const Tensor& w, const char* name, int64_t rows, int64_t cols, int64_t c, int64_t r) {
  const bool ok = w.size(0) == rows && w.size(1) == cols && (w.dim() == 2 || (w.size(2) == 1 && w.size(3) == 1));
  TORCH_CHECK_VALUE(ok, name, " must have shape (", rows, ", ", cols, ") or (", rows, ", ", cols, ", 1, 1) for x with ",
                    c, " channels and fc1_weight with ", r, " outputs, got ", py_shape(w.sizes()));
}

void check_parameter(const Tensor& t, const char* name, const Tensor& x, const Tensor& fc1_weight) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
                    "; all tensors must share a device");
  const bool half_x = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const bool allowed = t.scalar_type() == x.scalar_type() || (half_x && t.scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(allowed && t.scalar_type() == fc1_weight.scalar_type(), name, " has dtype ",
                   py_dtype(t.scalar_type()), "; parameters must all be ", py_dtype(x.scalar_type()),
                   half_x ? " or torch.float32" : "", " for x of dtype ", py_dtype(x.scalar_type()));
}

void check_vector(const Tensor& t, const char* name, const Tensor& x, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == compute_dtype(x), name, " must be ", py_dtype(compute_dtype(x)), ", got ",
                   py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous(), name,
                    " must be a contiguous (", rows, ", ", cols, ") tensor, got ", py_shape(t.sizes()));
}

// Checks x and the parameters (weights 2-D or 1x1-convolution 4-D); returns R.
int64_t check_inputs(const Tensor& x, const Tensor& w1, const c10::optional<Tensor>& b1, const Tensor& w2,
                     const c10::optional<Tensor>& b2) {
  check_dims(x, "x", 4);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x must be float16, bfloat16, float32 or float64, got ", py_dtype(x.scalar_type()));
  const int64_t c = x.size(1);
  TORCH_CHECK_VALUE(c > 0 && x.size(2) * x.size(3) > 0, "x must have at least one channel and one spatial "
                    "position, got shape ", py_shape(x.sizes()));
  check_dims(w1, "fc1_weight", 2, 4);
  check_dims(w2, "fc2_weight", 2, 4);
  const int64_t r = w1.size(0);
  check_weight(w1, "fc1_weight", r, c, c, r);
  check_weight(w2, "fc2_weight", c, r, c, r);
  TORCH_CHECK_VALUE(r > 0, "fc1_weight must have at least one output (hidden unit), got shape ", py_shape(w1.sizes()));
  for (const auto& [bias, name, size] : {std::tuple(&b1, "fc1_bias", r), std::tuple(&b2, "fc2_bias", c)}) {
    if (!*bias) continue;
    check_dims(**bias, name, 1);
    TORCH_CHECK_VALUE((*bias)->size(0) == size, name, " must have shape (", size, ",), got ",
                      py_shape((*bias)->sizes()));
  }
  check_parameter(w1, "fc1_weight", x, w1);
  check_parameter(w2, "fc2_weight", x, w1);
  if (b1) check_parameter(*b1, "fc1_bias", x, w1);
  if (b2) check_parameter(*b2, "fc2_bias", x, w1);
  return r;
}

// A full-size tensor beside x (residual, grad_y, y): x's shape, dtype and device.
void check_like_x(const Tensor& t, const char* name, const Tensor& x) {
  check_dims(t, name, 4);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have x's shape ", py_shape(x.sizes()), ", got ",
                    py_shape(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", py_dtype(x.scalar_type()),
                   ", got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

// An output buffer: NaN-filled under poisoning, so an element a kernel forgets to write fails the tests.
Tensor poisoned(Tensor t) {
  if (poison.load(std::memory_order_relaxed) && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace

at::ScalarType compute_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

ForcedSchedule forced_schedule() {
  const std::lock_guard<std::mutex> lock(forced_mutex);
  return forced;
}

void register_cuda_build(const char* arch_list, CudaScheduleDescriber describe) {
  cuda_linked() = true;
  cuda_arch_list() = arch_list;
  cuda_schedule_describer() = describe;
}

ForwardCall forward_call(const Tensor& x_in, const Tensor& fc1_weight, const c10::optional<Tensor>& fc1_bias,
                         const Tensor& fc2_weight, const c10::optional<Tensor>& fc2_bias, c10::string_view act,
                         c10::string_view gate, const c10::optional<Tensor>& residual_in, c10::string_view out_act) {
  const Act act_kind = parse_act(act);
  const Gate gate_kind = parse_gate(gate);
  const OutAct out_act_kind = parse_out_act(out_act);
  const int64_t r = check_inputs(x_in, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  if (residual_in) check_like_x(*residual_in, "residual", x_in);
  // every argument is checked before anything is allocated or launched
  const Tensor x = flattenable(x_in, at::MemoryFormat::Contiguous);
  const Tensor residual = residual_in ? flattenable(*residual_in, x.suggest_memory_format()) : Tensor();
  const int64_t n = x.size(0), c = x.size(1);
  const auto vec = x.options().dtype(compute_dtype(x));
  ForwardCall call{x, residual, poisoned(at::empty_like(x)), poisoned(at::empty({n, c}, vec)),
                   poisoned(at::empty({n, r}, vec)), poisoned(at::empty({n, c}, vec)), ForwardArgs{}};
  ForwardArgs& args = call.args;
  args.x = x.data_ptr();
  args.residual = residual.defined() ? residual.data_ptr() : nullptr;
  args.y = call.y.data_ptr();
  args.w1 = fc1_weight.data_ptr();
  args.b1 = fc1_bias ? fc1_bias->data_ptr() : nullptr;
  args.w2 = fc2_weight.data_ptr();
  args.b2 = fc2_bias ? fc2_bias->data_ptr() : nullptr;
  args.z = call.z.data_ptr();
  args.a = call.a.data_ptr();
  args.e = call.e.data_ptr();
  args.n = n;
  args.c = c;
  args.r = r;
  args.p = x.size(2) * x.size(3);
  args.x_strides = strides_of(x);
  args.residual_strides = residual.defined() ? strides_of(residual) : args.x_strides;
  args.y_strides = strides_of(call.y);
  args.w1_stride_r = fc1_weight.stride(0);
  args.w1_stride_c = fc1_weight.stride(1);
  args.w2_stride_c = fc2_weight.stride(0);
  args.w2_stride_r = fc2_weight.stride(1);
  args.x_dtype = to_dtype(x.scalar_type());
  args.param_dtype = to_dtype(fc1_weight.scalar_type());
  args.act = act_kind;
  args.gate = gate_kind;
  args.out_act = out_act_kind;
  return call;
}

BackwardCall backward_call(const Tensor& grad_y, const Tensor& x_in, const Tensor& fc1_weight,
                           const Tensor& fc2_weight, const Tensor& z, const Tensor& a, const Tensor& e,
                           c10::string_view act, c10::string_view gate, bool has_fc1_bias, bool has_fc2_bias,
                           bool need_dx, bool need_weight_grads, const c10::optional<Tensor>& y_in,
                           const c10::optional<Tensor>& residual_in, c10::string_view out_act,
                           bool need_residual_grad) {
  const Act act_kind = parse_act(act);
  const Gate gate_kind = parse_gate(gate);
  const int64_t r = check_inputs(x_in, fc1_weight, c10::nullopt, fc2_weight, c10::nullopt);
  const OutAct out_act_kind = parse_out_act(out_act);
  check_like_x(grad_y, "grad_y", x_in);
  // SiLU's residual is optional: without one the forward computed silu(x * s)
  for (const auto& [t, name, needed] : {std::tuple(&y_in, "y", out_act_kind == OutAct::kRelu),
                                        std::tuple(&residual_in, "residual", false)}) {
    if (*t) {
      check_like_x(**t, name, x_in);
    } else {
      TORCH_CHECK_VALUE(!needed, "the backward of out_act='", std::string(out_act), "' needs ", name, ", got None");
    }
  }
  const int64_t n = x_in.size(0), c = x_in.size(1);
  check_vector(z, "z", x_in, n, c);
  check_vector(a, "a", x_in, n, r);
  check_vector(e, "e", x_in, n, c);
  const Tensor x = flattenable(x_in, at::MemoryFormat::Contiguous);
  const auto format = x.suggest_memory_format();
  const Tensor g = flattenable(grad_y, format);
  const bool relu_tail = out_act_kind == OutAct::kRelu, silu_tail = out_act_kind == OutAct::kSilu;
  const Tensor y = relu_tail ? flattenable(*y_in, format) : Tensor();
  const Tensor residual = silu_tail && residual_in ? flattenable(*residual_in, format) : Tensor();
  need_residual_grad = need_residual_grad && out_act_kind != OutAct::kNone;

  const auto vec = x.options().dtype(compute_dtype(x));
  const auto param = fc1_weight.options();
  // weight gradients in the weights' own shapes, (R, C) or (R, C, 1, 1), contiguous
  const auto output = [&](bool needed, at::IntArrayRef shape) {
    return needed ? poisoned(at::empty(shape, param)) : at::empty({0}, param);
  };
  BackwardCall call{x, g, y, residual,
                    need_dx ? poisoned(at::empty_like(x)) : at::empty({0}, x.options()),
                    output(need_weight_grads, fc1_weight.sizes()),
                    output(need_weight_grads && has_fc1_bias, {r}),
                    output(need_weight_grads, fc2_weight.sizes()),
                    output(need_weight_grads && has_fc2_bias, {c}),
                    need_residual_grad ? poisoned(at::empty_like(x)) : at::empty({0}, x.options()),
                    poisoned(at::empty({n, c}, vec)),
                    poisoned(at::empty({n, r}, vec)),
                    poisoned(at::empty({n, c}, vec)),
                    BackwardArgs{}};
  if (n == 0) {  // a sum over an empty batch; no kernel runs
    for (Tensor* t : {&call.dw1, &call.db1, &call.dw2, &call.db2}) t->zero_();
  }
  BackwardArgs& args = call.args;
  args.grad_y = g.data_ptr();
  args.x = x.data_ptr();
  args.y = y.defined() ? y.data_ptr() : nullptr;
  args.residual = residual.defined() ? residual.data_ptr() : nullptr;
  args.d_residual = need_residual_grad ? call.d_residual.data_ptr() : nullptr;
  args.dx = need_dx ? call.dx.data_ptr() : nullptr;
  args.w1 = fc1_weight.data_ptr();
  args.w2 = fc2_weight.data_ptr();
  args.z = z.data_ptr();
  args.a = a.data_ptr();
  args.e = e.data_ptr();
  args.dw1 = need_weight_grads ? call.dw1.data_ptr() : nullptr;
  args.dw2 = need_weight_grads ? call.dw2.data_ptr() : nullptr;
  args.db1 = call.db1.numel() ? call.db1.data_ptr() : nullptr;
  args.db2 = call.db2.numel() ? call.db2.data_ptr() : nullptr;
  args.de = call.de.data_ptr();
  args.da = call.da.data_ptr();
  args.dzp = call.dzp.data_ptr();
  args.n = n;
  args.c = c;
  args.r = r;
  args.p = x.size(2) * x.size(3);
  args.g_strides = strides_of(g);
  args.x_strides = strides_of(x);
  args.y_strides = y.defined() ? strides_of(y) : args.x_strides;
  args.residual_strides = residual.defined() ? strides_of(residual) : args.x_strides;
  args.d_residual_strides = need_residual_grad ? strides_of(call.d_residual) : args.x_strides;
  args.dx_strides = need_dx ? strides_of(call.dx) : args.x_strides;
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
  args.act = act_kind;
  args.gate = gate_kind;
  args.out_act = out_act_kind;
  return call;
}

TORCH_LIBRARY(se_fused, m) {
  m.def("se_forward(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "str act, str gate, Tensor? residual=None, str out_act=\"none\") -> (Tensor y, Tensor z, Tensor a, Tensor e)");
  m.def("se_backward(Tensor grad_y, Tensor x, Tensor fc1_weight, Tensor fc2_weight, Tensor z, Tensor a, "
        "Tensor e, str act, str gate, bool has_fc1_bias, bool has_fc2_bias, bool need_dx, "
        "bool need_weight_grads, Tensor? y=None, Tensor? residual=None, str out_act=\"none\", "
        "bool need_residual_grad=False) -> (Tensor dx, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2, "
        "Tensor d_residual)");
}

// The ops compute; their autograd is se_fused.SqueezeExciteFunction. Backpropagating through a
// bare op call is an error, never a silent zero gradient.
TORCH_LIBRARY_IMPL(se_fused, Autograd, m) {
  m.impl("se_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("se_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace se_fused

// ----------------------------------------------------------------------------- Python module

namespace {

PyObject* set_poison_outputs(PyObject*, PyObject* flag) {
  const int on = PyObject_IsTrue(flag);
  if (on < 0) return nullptr;
  se_fused::poison.store(on != 0);
  Py_RETURN_NONE;
}

PyObject* set_forced_schedule(PyObject*, PyObject* args) {
  int split;
  long long group_size, num_programs;
  if (!PyArg_ParseTuple(args, "iLL", &split, &group_size, &num_programs)) return nullptr;
  const std::lock_guard<std::mutex> lock(se_fused::forced_mutex);
  se_fused::forced = {split, group_size, num_programs};
  Py_RETURN_NONE;
}

PyObject* cuda_schedule(PyObject*, PyObject* args) {
  const auto describe = se_fused::cuda_schedule_describer();
  if (describe == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "se_fused._C was built without the CUDA kernels");
    return nullptr;
  }
  std::vector<int64_t> problem(13);
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLLL", &problem[0], &problem[1], &problem[2], &problem[3], &problem[4],
                        &problem[5], &problem[6], &problem[7], &problem[8], &problem[9], &problem[10], &problem[11],
                        &problem[12])) {
    return nullptr;
  }
  const std::vector<int64_t> values = describe(problem);
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(values.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* v = PyLong_FromLongLong(values[i]);
    if (v == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), v);
  }
  return out;
}

PyObject* cpu_kernel_isa(PyObject*, PyObject*) { return PyUnicode_FromString(se_fused::cpu::kernel_isa()); }

PyMethodDef methods[] = {
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "The instruction set the C++ CPU kernel runs with here: DEFAULT, AVX2 or AVX512 (ATen's choice)."},
    {"set_poison_outputs", set_poison_outputs, METH_O, "NaN-fill every output buffer before the kernels write it."},
    {"cuda_schedule", cuda_schedule, METH_VARARGS,
     "cuda_schedule(n, c, r, p, channels_inner, element_size, num_sms, blocks_per_sm, l2_bytes, weight_grads, split, "
     "group_size, num_blocks): the CUDA kernels' plan and tickets, flat (se_fused.debug.cuda_schedule reads it)."},
    {"set_forced_schedule", set_forced_schedule, METH_VARARGS,
     "set_forced_schedule(split, group_size, num_programs): -1 / 0 leave the CUDA schedule heuristics in charge."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "se_fused's compiled ops and their test switches.", -1,
                          methods};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddObject(module, "with_cuda", PyBool_FromLong(se_fused::cuda_linked())) < 0 ||
      PyModule_AddStringConstant(module, "cuda_arch_list", se_fused::cuda_arch_list().c_str()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
