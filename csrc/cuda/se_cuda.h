// Fused SE CUDA kernels: forward in one launch, backward in one. CUDA headers only.
//
// Schedule (docs/DESIGN.md §3; the Triton kernels' ticket order, items sized for these kernels):
// a sample's (C, P) slice is cut into items (a range of channels x a segment of positions;
// split = false: the whole sample).
// Samples form groups; persistent blocks take tickets from an atomic counter, per group g:
//   R(g)  reduce items (per-channel partial sums),
//   M1(g) fc1 tiles: a small matrix product over kMlpSamples of the group's samples and
//         kMlpOutputs hidden units (forward a = z W1^T + b1; backward da = act'(a) (de W2)),
//   M2(g) fc2 tiles: the same over channels (forward e = act(a) W2^T + b2; backward dz/P = da W1 / P),
//   S(g)  rescale items (y, or dx),
// in the ticket order R(0) | M1(0) M2(0) R(1) S(0) | M1(1) M2(1) R(2) S(1) | ... | M1 M2 S(last),
// then (backward) the weight-gradient tiles, which sum over the batch in a fixed order.
// One counter per group counts finished work: M1 waits for the group's reduce items, M2 for its
// M1 tiles, S for its M2 tiles; the weight-gradient tiles wait for every group's M2 tiles (the
// batch counter). A block waits only on smaller tickets, held by running blocks whose own waits are
// on still smaller ones: no deadlock on any GPU, whatever the grid size. Weights are read once per
// tile, i.e. once per kMlpSamples samples, with 16-byte loads.
// Counters reset themselves (the last user zeroes them): no memset per call.
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
  int block_c;            // channels per step of an item's walk
  int item_c;             // channels per item (a multiple of block_c)
  int64_t seg_len;        // positions per item
  int num_segments;       // items along P per sample
  int items_per_sample;
  int group_size;         // samples per ticket group
  int num_groups;
  int fc1_splits;         // fc1's K (the channels) in ranges of kMlpSplitK
  int fc1_tiles;          // per group: sample chunks x splits x hidden-unit tiles
  int fc2_tiles;          // per group: sample chunks x channel tiles
  int wgrad_tiles;        // weight-gradient tiles, the last tickets (backward with weight grads)
  int num_tickets;
  int num_blocks;         // grid size
};

constexpr int kThreads = 256;
constexpr int kMlpSamples = 16;  // samples per MLP tile
constexpr int kMlpOutputs = 32;  // hidden units (fc1) or channels (fc2) per MLP tile
// Channels per fc1 tile (fc1's partial rows are added by fc2's tiles): a warp walks 4 steps of 8
// channels, each an L2 round trip; 2048 channels are 8 splits, and their tiles still one wave.
constexpr int kMlpSplitK = 256;

enum class Phase : int { kReduce = 0, kFc1 = 1, kFc2 = 2, kRescale = 3, kWeightGrads = 4 };

// What ticket `ticket` stands for (host and device: the kernels run it, tests check the plan).
struct Work {
  Phase phase;
  int group;
  int index;         // within the phase: the group's item, the group's MLP tile, the weight-gradient tile
  int64_t n0, n1;    // the group's samples
  int reduced;       // the group counter once its reduce items are done (n1 - n0 samples' items)
  int excited;       // ... and its MLP tiles too
  int64_t n;         // reduce and rescale items: the sample (>= N: none, in a short last group)
  int seg;           // its segment of positions
  int64_t c0, c1;    // its channels
  int64_t p0, p1;    // its positions
};

__host__ __device__ Work locate_work(int ticket, const CudaSchedule& s, int64_t n, int64_t c, int64_t p);

// num_sms x blocks_per_sm (what se_*_blocks_per_sm report for the kernel) blocks are resident at
// once: the grid, and the wave the items and groups are sized to fill.
// l2_bytes: the GPU's L2 size, which bounds how many small samples a group holds. weight_grads: the
// backward sums the weight gradients in the same launch (its last tickets).
// force_split: -1 lets the heuristic choose; 0 or 1 forces the regime. force_group_size and
// force_num_blocks (split regime): 0 lets the heuristic choose.
CudaSchedule plan_cuda_schedule(int64_t n, int64_t c, int64_t r, int64_t p, bool channels_inner, int element_size,
                                int num_sms, int blocks_per_sm, int64_t l2_bytes, bool weight_grads,
                                int force_split, int64_t force_group_size, int64_t force_num_blocks);

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// `partial` holds accumulators (float, or double for double input): the reduce items' partial sums
// (N x segments x C), then from this offset the fc1 tiles' partial rows (N x fc1 splits x R).
__host__ __device__ inline int64_t mlp_rows_offset(const CudaSchedule& s, int64_t n, int64_t c) {
  return n * s.num_segments * c;
}

inline int64_t partial_elements(const CudaSchedule& s, int64_t n, int64_t c, int64_t r) {
  return mlp_rows_offset(s, n, c) + n * s.fc1_splits * r;
}

// `sync` points at 2 + num_groups zero-initialised ints (ticket, batch counter, one counter per
// group) that are zero again when the kernel ends; `partial` at partial_elements() accumulators.
// Returns the launch error, if any.

cudaError_t se_forward_cuda(const ForwardArgs& args, const CudaSchedule& schedule, int* sync, void* partial,
                            cudaStream_t stream);
cudaError_t se_backward_cuda(const BackwardArgs& args, const CudaSchedule& schedule, int* sync, void* partial,
                             cudaStream_t stream);

// Blocks of the kernel these arguments launch that one SM of the current device holds at once
// (asked of the CUDA runtime's occupancy calculator once per device and kernel variant).
cudaError_t se_forward_blocks_per_sm(const ForwardArgs& args, int* blocks);
cudaError_t se_backward_blocks_per_sm(const BackwardArgs& args, int* blocks);

}  // namespace se_fused
