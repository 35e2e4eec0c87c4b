// The CUDA implementation of the se_fused ops: device guard, stream, the schedule plan and the
// per-stream workspace of self-resetting counters, then the kernels of se_cuda.cu. Compiled by the
// host compiler (torch headers here; the .cu file sees CUDA headers only).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "../se_binding.h"
#include "se_cuda.h"

#ifndef SE_FUSED_CUDA_ARCH_LIST
#define SE_FUSED_CUDA_ARCH_LIST "unknown"
#endif

namespace se_fused {
namespace {

// The plan of a problem (n, c, r, p, channels_inner, element_size, num_sms, blocks_per_sm, l2_bytes,
// weight_grads, force_split, force_group_size, force_num_blocks), then each ticket's Work: the
// layout se_fused.debug.cuda_schedule reads (CUDA_PLAN_FIELDS, CUDA_WORK_FIELDS).
std::vector<int64_t> describe_schedule(const std::vector<int64_t>& q) {
  const CudaSchedule s = plan_cuda_schedule(q[0], q[1], q[2], q[3], q[4] != 0, static_cast<int>(q[5]),
                                            static_cast<int>(q[6]), static_cast<int>(q[7]), q[8], q[9] != 0,
                                            static_cast<int>(q[10]), q[11], q[12]);
  std::vector<int64_t> out{s.split,      s.block_c,    s.item_c,     s.seg_len,   s.num_segments,
                           s.items_per_sample, s.group_size, s.num_groups, s.fc1_splits, s.fc1_tiles,
                           s.fc2_tiles, s.wgrad_tiles, s.num_tickets, s.num_blocks};
  for (int t = 0; t < s.num_tickets; ++t) {
    const Work w = locate_work(t, s, q[0], q[1], q[3]);
    out.insert(out.end(), {static_cast<int64_t>(w.phase), w.group, w.index, w.n0, w.n1, w.reduced, w.excited, w.n,
                           w.seg, w.c0, w.c1, w.p0, w.p1});
  }
  return out;
}

const bool registered = (register_cuda_build(SE_FUSED_CUDA_ARCH_LIST, describe_schedule), true);

// Self-resetting counters (ticket, batch counter, one counter per group of samples; zero between
// launches) of the current stream. Launches on one stream run in order, so they share one workspace.
// While a CUDA graph is captured, a fresh workspace comes from the graph's private pool (zeroed
// by a captured fill) and stays the graph's own: a cached one must never live in that pool.
Tensor sync_workspace(const Tensor& x, int64_t num_groups) {
  const int64_t size = 2 + num_groups;
  if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) {
    return at::zeros({size}, x.options().dtype(at::kInt));
  }
  static std::mutex mutex;
  // Never destroyed: freeing CUDA memory from a static destructor can outlive the CUDA context.
  static auto* workspaces = new std::map<std::pair<int, cudaStream_t>, Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& ws = (*workspaces)[{x.get_device(), at::cuda::getCurrentCUDAStream().stream()}];
  if (!ws.defined() || ws.numel() < size) {
    // Zeroed once here; afterwards the kernels leave every counter at zero.
    ws = at::zeros({std::max<int64_t>(size, ws.defined() ? 2 * ws.numel() : 0)}, x.options().dtype(at::kInt));
  }
  return ws;
}

// blocks_per_sm: the occupancy of the kernel variant the launch will take, on this device.
CudaSchedule schedule(const Tensor& x, int64_t r, const Strides3& s, bool weight_grads, int blocks_per_sm) {
  const ForcedSchedule forced = forced_schedule();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(blocks_per_sm > 0, "se_fused: the CUDA kernel for this input cannot run on ", props->name,
              " (no block fits on an SM)");
  return plan_cuda_schedule(x.size(0), x.size(1), r, x.size(2) * x.size(3), s.c == 1 && s.p != 1,
                            static_cast<int>(x.element_size()), props->multiProcessorCount, blocks_per_sm,
                            props->l2CacheSize, weight_grads, forced.split, forced.group_size, forced.num_programs);
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "se_fused: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

ForwardResult forward_cuda(const Tensor& x, const Tensor& fc1_weight, const c10::optional<Tensor>& fc1_bias,
                           const Tensor& fc2_weight, const c10::optional<Tensor>& fc2_bias, c10::string_view act,
                           c10::string_view gate, const c10::optional<Tensor>& residual, c10::string_view out_act) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ForwardCall call = forward_call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act);
  if (call.args.n == 0) return call.result();
  int blocks_per_sm = 0;
  check_cuda(se_forward_blocks_per_sm(call.args, &blocks_per_sm), "forward occupancy query");
  const CudaSchedule plan = schedule(x, call.args.r, call.args.x_strides, false, blocks_per_sm);
  const Tensor sync = sync_workspace(x, plan.num_groups);
  const Tensor partial = at::empty({partial_elements(plan, call.args.n, call.args.c, call.args.r)}, call.z.options());
  check_cuda(se_forward_cuda(call.args, plan, sync.data_ptr<int>(), partial.data_ptr(),
                             at::cuda::getCurrentCUDAStream().stream()),
             "forward launch");
  return call.result();
}

BackwardResult backward_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& fc1_weight,
                             const Tensor& fc2_weight, const Tensor& z, const Tensor& a, const Tensor& e,
                             c10::string_view act, c10::string_view gate, bool has_fc1_bias, bool has_fc2_bias,
                             bool need_dx, bool need_weight_grads, const c10::optional<Tensor>& y,
                             const c10::optional<Tensor>& residual, c10::string_view out_act,
                             bool need_residual_grad) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BackwardCall call = backward_call(grad_y, x, fc1_weight, fc2_weight, z, a, e, act, gate, has_fc1_bias,
                                          has_fc2_bias, need_dx, need_weight_grads, y, residual, out_act,
                                          need_residual_grad);
  if (call.args.n == 0) return call.result();
  int blocks_per_sm = 0;
  check_cuda(se_backward_blocks_per_sm(call.args, &blocks_per_sm), "backward occupancy query");
  const CudaSchedule plan = schedule(x, call.args.r, call.args.x_strides, call.args.dw1 != nullptr, blocks_per_sm);
  const Tensor sync = sync_workspace(x, plan.num_groups);
  const Tensor partial = at::empty({partial_elements(plan, call.args.n, call.args.c, call.args.r)}, call.de.options());
  check_cuda(se_backward_cuda(call.args, plan, sync.data_ptr<int>(), partial.data_ptr(),
                              at::cuda::getCurrentCUDAStream().stream()),
             "backward launch");
  return call.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(se_fused, CUDA, m) {
  m.impl("se_forward", &forward_cuda);
  m.impl("se_backward", &backward_cuda);
}

}  // namespace se_fused
