// Fused SE CUDA kernels: forward in one launch, backward in one. CUDA headers only.
//
// Schedule (docs/DESIGN.md §3, the same as the Triton kernels): a sample's (C, P)
// slice is cut into items (a block of channels x a segment of positions). Blocks take
// tickets from an atomic counter.
// - split = false: a ticket is a whole sample (reduce, MLP, rescale in one block).
// - split = true: persistent blocks; tickets ordered
//   "reduce g0 | reduce g1 | rescale g0 | reduce g2 | rescale g1 | ... | rescale g_last"
//   over groups of samples. The last reduce item of a sample (per-sample counter) runs
//   the MLP and raises the sample's flag; rescale items wait for it.
// - The backward's weight gradients are the last tickets (both regimes): tiles that wait
//   until a batch counter has counted every sample's MLP, then sum over the batch in order.
// A block waits only on smaller tickets, held by running blocks whose own waits are on
// still smaller ones: no deadlock on any GPU, whatever the grid size.
// Counters and flags reset themselves (the last user zeroes them): no memset per call.
// Partial sums are added in a fixed order: results are bitwise deterministic.
// The residual tail (docs/DESIGN.md §11) is a variant of the same kernels: the forward's rescale
// adds the residual and applies out_act; the backward's reduce items compute the gradient at the
// tail's input (and store it as d_residual), its rescale items recompute it.
#pragma once

#include <cuda_runtime.h>

#include "../se_params.h"

namespace se_fused {

struct CudaSchedule {
  bool split;
  int block_c;            // channels per item
  int64_t seg_len;        // positions per item
  int num_segments;       // items along P per sample
  int items_per_sample;
  int group_size;         // samples per ticket group
  int num_groups;
  int wgrad_tiles;        // weight-gradient tiles, the last tickets (backward with weight grads)
  int num_tickets;
  int num_blocks;         // grid size
};

constexpr int kThreads = 256;

// force_split: -1 lets the heuristic choose; 0 or 1 forces the regime. force_group_size and
// force_num_blocks (split regime): 0 lets the heuristic choose.
// l2_bytes: the GPU's L2 size, which bounds how many small samples a group holds. weight_grads: the
// backward sums the weight gradients in the same launch (its last tickets).
CudaSchedule plan_cuda_schedule(int64_t n, int64_t c, int64_t r, int64_t p, bool channels_inner, int element_size,
                                int num_sms, int64_t l2_bytes, bool weight_grads, int force_split,
                                int64_t force_group_size, int64_t force_num_blocks);

// `sync` points at 2 + 2*n zero-initialised ints (ticket, per-sample counters, per-sample
// flags, batch counter) that are zero again when the kernel ends. `partial` holds n * num_segments * c
// accumulators (float, or double for double input). Returns the launch error, if any.
cudaError_t se_forward_cuda(const ForwardArgs& args, const CudaSchedule& schedule, int* sync, void* partial,
                            cudaStream_t stream);
cudaError_t se_backward_cuda(const BackwardArgs& args, const CudaSchedule& schedule, int* sync, void* partial,
                             cudaStream_t stream);

}  // namespace se_fused
