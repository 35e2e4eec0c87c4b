// Fused SE CUDA kernels; the schedule is described in se_cuda.h.
#include "se_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../se_math.h"

namespace se_fused {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kBlockChannelsRows = 32;   // NCHW: channels per item (4 per warp)
constexpr int kBlockChannelsInner = 64;  // channels_last: channels per item
constexpr int64_t kItemElements = 16384;  // per split item: amortises its atomics and partial-sum store
constexpr int64_t kSampleBytesPerBlock = 128 * 1024;  // largest sample one block handles alone
constexpr int kBlocksPerSm = 4;
constexpr int kWeightGradTile = 32;  // channels and hidden units of a weight-gradient tile

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void from_acc(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void from_acc(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_acc(float v, float& out) { out = v; }
__device__ __forceinline__ void from_acc(double v, double& out) { out = v; }

// V consecutive elements moved as one 16-byte access when V > 1.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// A 16-byte pack stored with one st.global.v4: from a pack just assembled element by element, nvcc
// otherwise emits four 4-byte stores (seen in the unrolled rescale's SASS).
template <typename T, int V>
__device__ __forceinline__ void store_raw(T* p, const Pack<T, V>& pk) {
  if constexpr (sizeof(Pack<T, V>) == 16) {
    uint32_t w[4];
    memcpy(w, &pk, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)), "r"(w[0]),
                 "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
  }
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_raw(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V, typename A>
__device__ __forceinline__ void unpack(const Pack<T, V>& pk, A (&out)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_acc(pk.v[i]);
}

template <typename T, int V, typename A>
__device__ __forceinline__ void load_pack(const T* p, A (&out)[V]) {
  unpack(load_raw<T, V>(p), out);
}

template <typename T, int V, typename A>
__device__ __forceinline__ void store_pack(T* p, const A (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) from_acc(in[i], pk.v[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One sample's view of a (C, P) tensor.
template <typename T>
struct SampleView {
  T* base;
  int64_t sc, sp;
  __device__ T* at(int64_t c, int64_t p) const { return base + c * sc + p * sp; }
};

template <typename T>
__device__ SampleView<T> sample_view(const void* ptr, const Strides3& s, int64_t n) {
  return {static_cast<T*>(const_cast<void*>(ptr)) + n * s.n, s.c, s.p};
}

// An optional tensor's sample: a null base when it is absent. Only for optional tensors: the test
// costs the streaming kernels registers (ptxas), even where the view is never read.
template <typename T>
__device__ SampleView<T> optional_view(const void* ptr, const Strides3& s, int64_t n) {
  return ptr ? sample_view<T>(ptr, s, n) : SampleView<T>{nullptr, s.c, s.p};
}

// The walkers below visit an item in V-element packs along its contiguous axis: NCHW rows with a
// warp per channel and lanes along positions; channels_last (CH_INNER) with lanes along channels
// and rows of threads along positions. What a pack contributes comes from a functor: `channel(c)`
// gives channel c's constants (`Channel`), handed to each pack as k[V] (one value repeated in rows,
// one per channel in channels_last); `load` and `store` read and write the pack at (c, p).

// out[c] = Σ_{p in [p0, p1)} of the terms term.load(c, p, k, v) gives, for c in [c0, c1).
template <typename A, int V, bool CH_INNER, typename Term>
__device__ void reduce_item(const Term& term, int64_t c0, int64_t c1, int64_t p0, int64_t p1, A* out) {
  using K = typename Term::Channel;
  if constexpr (!CH_INNER) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t c = c0 + warp; c < c1; c += kWarps) {
      const K kc = term.channel(c);
      K k[V];
#pragma unroll
      for (int i = 0; i < V; ++i) k[i] = kc;
      A acc = 0;
      for (int64_t p = p0 + lane * V; p < p1; p += 32 * V) {
        A v[V];
        term.load(c, p, k, v);
#pragma unroll
        for (int i = 0; i < V; ++i) acc += v[i];
      }
      acc = warp_sum(acc);
      if (lane == 0) out[c] = acc;
    }
  } else {
    constexpr int kLanesC = kBlockChannelsInner / V;  // threads side by side along channels
    constexpr int kRows = kThreads / kLanesC;        // positions handled at once
    __shared__ A rows[kRows][kBlockChannelsInner];
    const int lane_c = threadIdx.x % kLanesC, row = threadIdx.x / kLanesC;
    const int64_t c = c0 + lane_c * V;
    A acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0;
    if (c < c1) {
      K k[V];
#pragma unroll
      for (int i = 0; i < V; ++i) k[i] = term.channel(c + i);
      for (int64_t p = p0 + row; p < p1; p += kRows) {
        A v[V];
        term.load(c, p, k, v);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += v[i];
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) rows[row][lane_c * V + i] = acc[i];
    __syncthreads();
    if (threadIdx.x < kBlockChannelsInner && c0 + threadIdx.x < c1) {
      A sum = 0;
      for (int r = 0; r < kRows; ++r) sum += rows[r][threadIdx.x];
      out[c0 + threadIdx.x] = sum;
    }
    __syncthreads();  // `rows` is reused by the next item
  }
}

// step.store(c, p, step.load(c, p), k) for every pack of the item, c in [c0, c1), p in [p0, p1).
// Each thread issues the loads of Step::kUnroll positions before its first store: the inputs and the
// output are not known not to alias, so a load → store → load loop keeps one load in flight per
// thread. Steps that read two or three tensors unroll less: about as many bytes in flight, fewer
// registers (at 4, ptxas spilled the tail's forward).
template <int V, bool CH_INNER, typename Step>
__device__ void rescale_item(const Step& step, int64_t c0, int64_t c1, int64_t p0, int64_t p1) {
  constexpr int kUnroll = Step::kUnroll;
  using K = typename Step::Channel;
  using L = typename Step::Loaded;
  // positions [p, p + kUnroll * stride) of channels [c, c + V): loads first, then the stores
  const auto scale_positions = [&](int64_t c, int64_t p, int64_t stride, const K (&k)[V]) {
    L raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p + u * stride < p1) raw[u] = step.load(c, p + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p + u * stride < p1) step.store(c, p + u * stride, raw[u], k);
    }
  };
  if constexpr (!CH_INNER) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t c = c0 + warp; c < c1; c += kWarps) {
      const K kc = step.channel(c);
      K k[V];
#pragma unroll
      for (int i = 0; i < V; ++i) k[i] = kc;
      for (int64_t p = p0 + lane * V; p < p1; p += kUnroll * 32 * V) scale_positions(c, p, 32 * V, k);
    }
  } else {
    constexpr int kLanesC = kBlockChannelsInner / V;
    constexpr int kRows = kThreads / kLanesC;
    const int lane_c = threadIdx.x % kLanesC, row = threadIdx.x / kLanesC;
    const int64_t c = c0 + lane_c * V;
    if (c >= c1) return;
    K k[V];
#pragma unroll
    for (int i = 0; i < V; ++i) k[i] = step.channel(c + i);
    for (int64_t p = p0 + row; p < p1; p += kUnroll * kRows) scale_positions(c, p, kRows, k);
  }
}

// The tail's input x · s + r (r the residual, or 0 without one), rounded once: the forward and the
// SiLU backward's recomputation must agree, and contraction would otherwise be ptxas's choice.
template <typename A>
__device__ __forceinline__ A tail_input(A x, A s, A r) {
  return fma(x, s, r);
}

// The residual tail's gradient at its input (docs/DESIGN.md §11), dt = g · out_act'(t) for V
// elements: t = u for ReLU (u is y) and u · s + r for SiLU (u is x, r the residual or 0), the
// value the forward's rescale computed.
template <typename A, int V>
__device__ __forceinline__ void tail_gradient(OutAct out_act, const A (&g)[V], const A (&u)[V], const A (&r)[V],
                                              const A (&s)[V], A (&dt)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const A t = out_act == OutAct::kRelu ? u[i] : tail_input(u[i], s[i], r[i]);
    dt[i] = out_activation_backward(g[i], t, out_act);
  }
}

struct NoChannelConstants {};

// Forward reduce: the terms are x.
template <typename T, typename A, int V>
struct SumOfX {
  using Channel = NoChannelConstants;
  SampleView<const T> x;
  __device__ Channel channel(int64_t) const { return {}; }
  __device__ void load(int64_t c, int64_t p, const Channel (&)[V], A (&v)[V]) const { load_pack<T, V>(x.at(c, p), v); }
};

// Backward reduce: the terms are dt · x, dt = g, or with the tail (TAIL) g · out_act'(·) from y
// (ReLU) or x · s + residual (SiLU), stored as d_residual when that is asked for.
template <typename T, typename A, int V, bool TAIL>
struct SumOfGradTimesX {
  struct Channel {
    A s;
  };
  SampleView<const T> g, x, y, residual;  // y: ReLU tail; residual base null: none
  SampleView<T> d_residual;               // base null: not written
  const A* e;
  Gate gate;
  OutAct out_act;
  __device__ Channel channel(int64_t c) const {
    if constexpr (TAIL) return {out_act == OutAct::kSilu ? gate_fn(e[c], gate) : A(0)};  // ReLU needs no s
    return {A(0)};
  }
  __device__ void load(int64_t c, int64_t p, const Channel (&k)[V], A (&v)[V]) const {
    A vg[V], vx[V];
    load_pack<T, V>(g.at(c, p), vg);
    load_pack<T, V>(x.at(c, p), vx);
    if constexpr (TAIL) {
      A u[V], r[V], s[V], dt[V];
#pragma unroll
      for (int i = 0; i < V; ++i) u[i] = vx[i], r[i] = 0, s[i] = k[i].s;
      if (out_act == OutAct::kRelu) load_pack<T, V>(y.at(c, p), u);
      else if (residual.base) load_pack<T, V>(residual.at(c, p), r);
      tail_gradient(out_act, vg, u, r, s, dt);
      if (d_residual.base) store_pack<T, V>(d_residual.at(c, p), dt);
#pragma unroll
      for (int i = 0; i < V; ++i) vg[i] = dt[i];
    }
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = vg[i] * vx[i];
  }
};

// Forward rescale: y = x · s, or with the tail (TAIL) out_act(x · s + residual).
// e was written by other blocks in this launch: read through L2 (__ldcg).
template <typename T, typename A, int V, bool TAIL>
struct ScaleForward {
  struct Channel {
    A s;
  };
  struct Loaded {
    Pack<T, V> x, r;
  };
  static constexpr int kUnroll = TAIL ? 2 : 4;
  SampleView<const T> x, residual;  // residual base null: none
  SampleView<T> y;
  const A* e;
  Gate gate;
  OutAct out_act;
  __device__ Channel channel(int64_t c) const { return {gate_fn(__ldcg(e + c), gate)}; }
  __device__ Loaded load(int64_t c, int64_t p) const {
    Loaded l;
    l.x = load_raw<T, V>(x.at(c, p));
    if constexpr (TAIL) {
      if (residual.base) l.r = load_raw<T, V>(residual.at(c, p));
    }
    return l;
  }
  __device__ void store(int64_t c, int64_t p, const Loaded& l, const Channel (&k)[V]) const {
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      A v;
      if constexpr (TAIL) {
        v = out_activation(tail_input(to_acc(l.x.v[i]), k[i].s, residual.base ? to_acc(l.r.v[i]) : A(0)), out_act);
      } else {
        v = to_acc(l.x.v[i]) * k[i].s;
      }
      from_acc(v, out.v[i]);
    }
    store_raw<T, V>(y.at(c, p), out);
  }
};

// Backward rescale: dx = dt · s + dz/P, dt = g, or with the tail (TAIL) recomputed from g and u
// (y for ReLU, x for SiLU) and the residual as the reduce items computed it. dz/P was written by
// other blocks in this launch: read through L2 (__ldcg).
template <typename T, typename A, int V, bool TAIL>
struct ScaleBackward {
  struct Channel {
    A s, shift;
  };
  struct Loaded {
    Pack<T, V> g, u, r;
  };
  static constexpr int kUnroll = TAIL ? 2 : 4;
  SampleView<const T> g, u, residual;  // u: the tail's y (ReLU) or x (SiLU); residual base null: none
  SampleView<T> dx;
  const A* e;
  const A* dzp;
  Gate gate;
  OutAct out_act;
  __device__ Channel channel(int64_t c) const { return {gate_fn(__ldcg(e + c), gate), __ldcg(dzp + c)}; }
  __device__ Loaded load(int64_t c, int64_t p) const {
    Loaded l;
    l.g = load_raw<T, V>(g.at(c, p));
    if constexpr (TAIL) {
      l.u = load_raw<T, V>(u.at(c, p));
      if (out_act == OutAct::kSilu && residual.base) l.r = load_raw<T, V>(residual.at(c, p));
    }
    return l;
  }
  __device__ void store(int64_t c, int64_t p, const Loaded& l, const Channel (&k)[V]) const {
    A g[V], s[V], dt[V];
    unpack(l.g, g);
#pragma unroll
    for (int i = 0; i < V; ++i) s[i] = k[i].s, dt[i] = g[i];
    if constexpr (TAIL) {
      A u[V], r[V];
      unpack(l.u, u);
#pragma unroll
      for (int i = 0; i < V; ++i) r[i] = 0;
      if (out_act == OutAct::kSilu && residual.base) unpack(l.r, r);
      tail_gradient(out_act, g, u, r, s, dt);
    }
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) from_acc(dt[i] * s[i] + k[i].shift, out.v[i]);
    store_raw<T, V>(dx.at(c, p), out);
  }
};

// Sample n's MLP: z = Σ partials / P, a = W1 z + b1, e = W2 act(a) + b2. `h` is R shared accumulators.
template <typename PT, typename A>
__device__ void excite_forward(const ForwardArgs& args, int64_t n, const A* partial, int num_segments, A* h) {
  const int64_t C = args.c, R = args.r;
  const PT* w1 = static_cast<const PT*>(args.w1);
  const PT* w2 = static_cast<const PT*>(args.w2);
  const PT* b1 = static_cast<const PT*>(args.b1);
  const PT* b2 = static_cast<const PT*>(args.b2);
  A* z = static_cast<A*>(args.z) + n * C;
  A* a = static_cast<A*>(args.a) + n * R;
  A* e = static_cast<A*>(args.e) + n * C;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    A sum = 0;
    for (int seg = 0; seg < num_segments; ++seg) sum += __ldcg(partial + (n * num_segments + seg) * C + c);
    z[c] = sum / static_cast<A>(args.p);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t r = warp; r < R; r += kWarps) {
    A acc = 0;
    for (int64_t c = lane; c < C; c += 32) acc += to_acc(w1[r * args.w1_stride_r + c * args.w1_stride_c]) * z[c];
    acc = warp_sum(acc);
    if (lane == 0) {
      if (b1) acc += to_acc(b1[r]);
      a[r] = acc;
      h[r] = activation(acc, args.act);
    }
  }
  __syncthreads();
  for (int64_t c = warp; c < C; c += kWarps) {
    A acc = 0;
    for (int64_t r = lane; r < R; r += 32) acc += to_acc(w2[c * args.w2_stride_c + r * args.w2_stride_r]) * h[r];
    acc = warp_sum(acc);
    if (lane == 0) e[c] = acc + (b2 ? to_acc(b2[c]) : A(0));
  }
}

// Sample n's MLP backward from ds = Σ partials: de, da (R shared accumulators `da_s`), dz / P.
template <typename PT, typename A>
__device__ void excite_backward(const BackwardArgs& args, int64_t n, const A* partial, int num_segments, A* da_s) {
  const int64_t C = args.c, R = args.r;
  const PT* w1 = static_cast<const PT*>(args.w1);
  const PT* w2 = static_cast<const PT*>(args.w2);
  const A* a = static_cast<const A*>(args.a) + n * R;
  const A* e = static_cast<const A*>(args.e) + n * C;
  A* de = static_cast<A*>(args.de) + n * C;
  A* da = static_cast<A*>(args.da) + n * R;
  A* dzp = static_cast<A*>(args.dzp) + n * C;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    A ds = 0;
    for (int seg = 0; seg < num_segments; ++seg) ds += __ldcg(partial + (n * num_segments + seg) * C + c);
    de[c] = gate_backward(ds, e[c], args.gate);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t r = warp; r < R; r += kWarps) {
    A dh = 0;
    for (int64_t c = lane; c < C; c += 32) dh += to_acc(w2[c * args.w2_stride_c + r * args.w2_stride_r]) * de[c];
    dh = warp_sum(dh);
    if (lane == 0) {
      const A v = activation_backward(dh, a[r], args.act);
      da[r] = v;
      da_s[r] = v;
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    A dz = 0;
    for (int64_t r = 0; r < R; ++r) dz += to_acc(w1[r * args.w1_stride_r + c * args.w1_stride_c]) * da_s[r];
    dzp[c] = dz / static_cast<A>(args.p);
  }
}

struct Item {
  bool is_reduce;
  int64_t n, c0, c1, p0, p1;
  int seg;
};

// Ticket -> item, in the order documented in se_cuda.h.
__device__ Item decode_ticket(int ticket, const CudaSchedule& s, int64_t C, int64_t P) {
  const int group_items = s.group_size * s.items_per_sample;
  const int half = ticket / group_items, j = ticket % group_items;
  Item it;
  it.is_reduce = half == 0 || (half % 2 == 1 && (half + 1) / 2 < s.num_groups);
  const int group = it.is_reduce ? (half + 1) / 2 : (half - 1) / 2;
  it.n = static_cast<int64_t>(group) * s.group_size + j / s.items_per_sample;
  const int item = j % s.items_per_sample;
  it.seg = item % s.num_segments;
  it.c0 = static_cast<int64_t>(item / s.num_segments) * s.block_c;
  it.c1 = min(C, it.c0 + s.block_c);
  it.p0 = it.seg * s.seg_len;
  it.p1 = min(P, it.p0 + s.seg_len);
  return it;
}

// Block-wide: thread 0 draws a ticket, everyone gets it.
__device__ int draw_ticket(int* ticket) {
  __shared__ int drawn;
  __syncthreads();  // everyone has read the previous `drawn`
  if (threadIdx.x == 0) drawn = atomicAdd(ticket, 1);
  __syncthreads();
  return drawn;
}

// After a reduce item's partial sums are stored: true (block-wide) for the sample's last item.
__device__ bool arrive_reduced(int* counter, int items_per_sample) {
  __shared__ int last;
  __threadfence();  // this thread's partial sums are visible device-wide before the count
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == items_per_sample - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// After a sample's MLP: its results are visible device-wide, then its flag is raised (split
// regime) and, when the launch sums weight gradients, the batch counter counts it.
__device__ void publish(int* flag, int* batch) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    if (flag) atomicExch(flag, 1);
    if (batch) atomicAdd(batch, 1);
  }
}

__device__ void wait_published(int* flag) {
  if (threadIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
}

// After a rescale item: the sample's last one zeroes its counter and flag for the next launch.
__device__ void release_rescaled(int* counter, int* flag, int items_per_sample) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(counter, 1) == 2 * items_per_sample - 1) {
    atomicExch(counter, 0);
    atomicExch(flag, 0);
  }
}

// Before a weight-gradient tile: every sample's MLP is done (the batch counter reached n) and visible.
__device__ void wait_batch(int* batch, int64_t n) {
  if (threadIdx.x == 0) {
    while (atomicAdd(batch, 0) < n) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
}

// After a weight-gradient tile: the last of them zeroes the batch counter for the next launch.
__device__ void release_batch(int* batch, int64_t n, int wgrad_tiles) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(batch, 1) == n + wgrad_tiles - 1) atomicExch(batch, 0);
}

__device__ void retire(int* ticket, int last_ticket, int num_tickets) {
  if (threadIdx.x == 0 && last_ticket == num_tickets + static_cast<int>(gridDim.x) - 1) atomicExch(ticket, 0);
}

// Runs the schedule of se_cuda.h; `ops` supplies the steps for one sample n, and the backward's
// weight-gradient tiles:
//   ops.reduce(n, c0, c1, p0, p1, out)   per-channel sums of channels [c0, c1) into out[c]
//   ops.excite(n, num_segments)          the sample's MLP, from its partial sums
//   ops.rescale(n, c0, c1, p0, p1)       the elementwise output of that item
//   ops.weight_grads(tile)               one tile of the weight gradients, summed over the batch
//                                        (backward: Ops::kWeightGrads)
// Tickets come from one counter in both regimes; the weight-gradient tiles are the last of them
// and wait for every sample's MLP (the batch counter), held by blocks that drew smaller tickets.
template <typename Ops, typename A>
__device__ void run_schedule(const CudaSchedule& s, int64_t N, int64_t C, int64_t P, int* sync, A* partial,
                             Ops& ops) {
  int* ticket_counter = sync;
  int* counters = sync + 1;
  int* flags = sync + 1 + N;
  int* batch = s.wgrad_tiles ? sync + 1 + 2 * N : nullptr;
  const int samples_end = s.num_tickets - s.wgrad_tiles;  // tickets from it on are weight-gradient tiles
  const auto whole_sample = [&](int64_t n) {  // split = false: reduce, MLP, rescale in this block
    for (int64_t c0 = 0; c0 < C; c0 += s.block_c) ops.reduce(n, c0, min(C, c0 + s.block_c), 0, P, partial + n * C);
    __syncthreads();
    ops.excite(n, 1);
    publish(nullptr, batch);
    for (int64_t c0 = 0; c0 < C; c0 += s.block_c) ops.rescale(n, c0, min(C, c0 + s.block_c), 0, P);
  };
  if constexpr (!Ops::kWeightGrads) {
    if (!s.split) return whole_sample(blockIdx.x);  // a block a sample, nothing after them
  }
  int ticket;
  if (!s.split) {  // a ticket a sample, so that the weight-gradient tickets can follow them
    while ((ticket = draw_ticket(ticket_counter)) < samples_end) whole_sample(ticket);
  } else {
    while ((ticket = draw_ticket(ticket_counter)) < samples_end) {
      const Item it = decode_ticket(ticket, s, C, P);
      if (it.n >= N) continue;
      if (it.is_reduce) {
        ops.reduce(it.n, it.c0, it.c1, it.p0, it.p1, partial + (it.n * s.num_segments + it.seg) * C);
        if (arrive_reduced(counters + it.n, s.items_per_sample)) {
          ops.excite(it.n, s.num_segments);
          publish(flags + it.n, batch);
        }
      } else {
        wait_published(flags + it.n);
        ops.rescale(it.n, it.c0, it.c1, it.p0, it.p1);
        release_rescaled(counters + it.n, flags + it.n, s.items_per_sample);
      }
    }
  }
  if constexpr (Ops::kWeightGrads) {  // past the samples' tickets, in a loop of its own
    for (; ticket < s.num_tickets; ticket = draw_ticket(ticket_counter)) {
      wait_batch(batch, N);
      ops.weight_grads(ticket - samples_end);
      release_batch(batch, N, s.wgrad_tiles);
    }
  }
  retire(ticket_counter, ticket, s.num_tickets);
}

// Forward: reduce x, excite (z, a, e), rescale y = x * gate(e), or out_act(x * gate(e) + residual)
// with the residual tail (TAIL).
template <typename T, typename PT, int V, bool CH_INNER, bool TAIL>
struct ForwardOps {
  using A = acc_t<T>;
  static constexpr bool kWeightGrads = false;  // the forward plans no weight-gradient tiles
  const ForwardArgs& args;
  const A* partial;
  A* h;  // R shared accumulators

  __device__ SampleView<const T> x(int64_t n) const { return sample_view<const T>(args.x, args.x_strides, n); }
  __device__ void reduce(int64_t n, int64_t c0, int64_t c1, int64_t p0, int64_t p1, A* out) const {
    reduce_item<A, V, CH_INNER>(SumOfX<T, A, V>{x(n)}, c0, c1, p0, p1, out);
  }
  __device__ void excite(int64_t n, int num_segments) const {
    excite_forward<PT>(args, n, partial, num_segments, h);
  }
  __device__ void rescale(int64_t n, int64_t c0, int64_t c1, int64_t p0, int64_t p1) const {
    const ScaleForward<T, A, V, TAIL> step{x(n), optional_view<const T>(args.residual, args.residual_strides, n),
                                           sample_view<T>(args.y, args.y_strides, n),
                                           static_cast<const A*>(args.e) + n * args.c, args.gate, args.out_act};
    rescale_item<V, CH_INNER>(step, c0, c1, p0, p1);
  }
};

// One tile of the weight gradients, the backward's last tickets: dW2 = deᵀ act(a), dW1 = daᵀ z,
// db2 = Σ de, db1 = Σ da, summed over n in order (deterministic). Tile t covers channels
// [32 (t mod ⌈C/32⌉), +32) and hidden units [32 ⌊t / ⌈C/32⌉⌋, +32); thread (tx, ty) owns rows ty,
// ty+8, ... de and da were written by other blocks in this launch: read through L2 (__ldcg).
template <typename PT, typename A>
__device__ void weight_grad_tile(const BackwardArgs& args, int tile) {
  constexpr int kTile = kWeightGradTile, kRowsPerThread = kTile / kWarps;
  const int64_t C = args.c, R = args.r;
  const int channel_tiles = static_cast<int>((C + kTile - 1) / kTile);
  const int64_t c_tile = tile % channel_tiles, r_tile = tile / channel_tiles;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t c = c_tile * kTile + tx;
  const A* de = static_cast<const A*>(args.de);
  const A* da = static_cast<const A*>(args.da);
  const A* z = static_cast<const A*>(args.z);
  const A* a = static_cast<const A*>(args.a);
  A dw2[kRowsPerThread] = {}, dw1[kRowsPerThread] = {};
  for (int64_t n = 0; n < args.n; ++n) {
    const A de_nc = c < C ? __ldcg(de + n * C + c) : A(0);
    const A z_nc = c < C ? z[n * C + c] : A(0);
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t r = r_tile * kTile + ty + k * kWarps;
      if (r < R) {
        dw2[k] += de_nc * activation(a[n * R + r], args.act);
        dw1[k] += z_nc * __ldcg(da + n * R + r);
      }
    }
  }
  PT* out_w2 = static_cast<PT*>(args.dw2);
  PT* out_w1 = static_cast<PT*>(args.dw1);
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t r = r_tile * kTile + ty + k * kWarps;
    if (c < C && r < R) {
      from_acc(dw2[k], out_w2[c * args.dw2_stride_c + r * args.dw2_stride_r]);
      from_acc(dw1[k], out_w1[r * args.dw1_stride_r + c * args.dw1_stride_c]);
    }
  }
  if (args.db2 && r_tile == 0 && ty == 0 && c < C) {
    A sum = 0;
    for (int64_t n = 0; n < args.n; ++n) sum += __ldcg(de + n * C + c);
    from_acc(sum, static_cast<PT*>(args.db2)[c]);
  }
  const int64_t r = r_tile * kTile + tx;
  if (args.db1 && c_tile == 0 && ty == 0 && r < R) {
    A sum = 0;
    for (int64_t n = 0; n < args.n; ++n) sum += __ldcg(da + n * R + r);
    from_acc(sum, static_cast<PT*>(args.db1)[r]);
  }
}

// Backward: reduce dt·x, excite backward (de, da, dz/P), rescale dx = dt * gate(e) + dz/P, where dt
// is grad_y, or with the residual tail (TAIL) the gradient at its input, written as d_residual.
template <typename T, typename PT, int V, bool CH_INNER, bool TAIL>
struct BackwardOps {
  using A = acc_t<T>;
  static constexpr bool kWeightGrads = true;
  const BackwardArgs& args;
  const A* partial;
  A* da;  // R shared accumulators

  __device__ SampleView<const T> view(const void* ptr, const Strides3& s, int64_t n) const {
    return sample_view<const T>(ptr, s, n);
  }
  __device__ void reduce(int64_t n, int64_t c0, int64_t c1, int64_t p0, int64_t p1, A* out) const {
    const SumOfGradTimesX<T, A, V, TAIL> term{
        view(args.grad_y, args.g_strides, n), view(args.x, args.x_strides, n),
        optional_view<const T>(args.y, args.y_strides, n),
        optional_view<const T>(args.residual, args.residual_strides, n),
        optional_view<T>(args.d_residual, args.d_residual_strides, n), static_cast<const A*>(args.e) + n * args.c,
        args.gate, args.out_act};
    reduce_item<A, V, CH_INNER>(term, c0, c1, p0, p1, out);
  }
  __device__ void excite(int64_t n, int num_segments) const {
    excite_backward<PT>(args, n, partial, num_segments, da);
  }
  __device__ void weight_grads(int tile) const { weight_grad_tile<PT, A>(args, tile); }
  __device__ void rescale(int64_t n, int64_t c0, int64_t c1, int64_t p0, int64_t p1) const {
    if (!args.dx) return;
    const bool relu = args.out_act == OutAct::kRelu;
    const ScaleBackward<T, A, V, TAIL> step{
        view(args.grad_y, args.g_strides, n),
        relu ? view(args.y, args.y_strides, n) : view(args.x, args.x_strides, n),
        optional_view<const T>(args.residual, args.residual_strides, n), sample_view<T>(args.dx, args.dx_strides, n),
        static_cast<const A*>(args.e) + n * args.c, static_cast<const A*>(args.dzp) + n * args.c, args.gate,
        args.out_act};
    rescale_item<V, CH_INNER>(step, c0, c1, p0, p1);
  }
};

template <typename T, typename PT, int V, bool CH_INNER, bool TAIL>
__global__ void __launch_bounds__(kThreads) se_forward_kernel(ForwardArgs args, CudaSchedule s, int* sync,
                                                              acc_t<T>* partial) {
  extern __shared__ unsigned char smem[];
  ForwardOps<T, PT, V, CH_INNER, TAIL> ops{args, partial, reinterpret_cast<acc_t<T>*>(smem)};
  run_schedule(s, args.n, args.c, args.p, sync, partial, ops);
}

template <typename T, typename PT, int V, bool CH_INNER, bool TAIL>
__global__ void __launch_bounds__(kThreads) se_backward_kernel(BackwardArgs args, CudaSchedule s, int* sync,
                                                               acc_t<T>* partial) {
  extern __shared__ unsigned char smem[];
  BackwardOps<T, PT, V, CH_INNER, TAIL> ops{args, partial, reinterpret_cast<acc_t<T>*>(smem)};
  run_schedule(s, args.n, args.c, args.p, sync, partial, ops);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Bytes of the R shared accumulators, rounded up to 16: nvcc reads the tail of a loop over them
// (the dz sum of excite_backward) with one 16-byte LDS that may pass element R - 1; without the
// padding that read leaves the allocation (compute-sanitizer memcheck, first GPU run).
template <typename A>
size_t shared_accumulator_bytes(int64_t r) {
  return static_cast<size_t>((r * static_cast<int64_t>(sizeof(A)) + 15) / 16 * 16);
}

// Can every tensor in `views` be moved in V-element packs? Needs stride 1 along the
// contiguous axis, the other strides and the axis length multiples of V, 16-byte bases.
// Null pointers (optional tensors that are absent) are skipped.
template <int V>
bool packable(bool channels_inner, int64_t c, int64_t p,
              std::initializer_list<std::pair<const void*, Strides3>> views) {
  if (V == 1) return true;
  if ((channels_inner ? c : p) % V != 0) return false;
  for (const auto& [ptr, s] : views) {
    if (!ptr) continue;
    const int64_t unit = channels_inner ? s.c : s.p, other = channels_inner ? s.p : s.c;
    if (!aligned16(ptr) || unit != 1 || other % V != 0 || s.n % V != 0) return false;
  }
  return true;
}

template <typename Kernel, typename Args, typename Acc>
cudaError_t launch(Kernel kernel, const Args& args, const CudaSchedule& s, int* sync, Acc* partial, size_t smem,
                   cudaStream_t stream) {
  kernel<<<s.num_blocks, kThreads, smem, stream>>>(args, s, sync, partial);
  return cudaGetLastError();
}

// fn(std::true_type{}) or fn(std::false_type{}): a runtime flag as a template argument.
template <typename Fn>
cudaError_t with_flag(bool flag, Fn&& fn) {
  return flag ? fn(std::true_type{}) : fn(std::false_type{});
}

// Calls fn(v, inner, tail) with the pack width v (V or 1), the layout and the tail as constants.
template <int V, typename Fn>
cudaError_t with_variant(bool packed, bool inner, bool tail, Fn&& fn) {
  return with_flag(packed, [&](auto pk) {
    return with_flag(inner, [&](auto in) {
      return with_flag(tail, [&](auto tl) {
        return fn(std::integral_constant<int, decltype(pk)::value ? V : 1>{}, in, tl);
      });
    });
  });
}

// Picks (pack width, layout, tail) for one (x dtype, parameter dtype) pair and launches.
template <typename T, typename PT>
cudaError_t forward_typed(const ForwardArgs& args, const CudaSchedule& s, int* sync, void* partial,
                          cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  const bool inner = args.x_strides.c == 1 && args.x_strides.p != 1;
  const bool packed = packable<V>(inner, args.c, args.p,
                                  {{args.x, args.x_strides}, {args.y, args.y_strides},
                                   {args.residual, args.residual_strides}});
  const bool tail = args.residual != nullptr || args.out_act != OutAct::kNone;
  return with_variant<V>(packed, inner, tail, [&](auto v, auto in, auto tl) {
    return launch(se_forward_kernel<T, PT, decltype(v)::value, decltype(in)::value, decltype(tl)::value>, args, s,
                  sync, static_cast<A*>(partial), shared_accumulator_bytes<A>(args.r), stream);
  });
}

template <typename T, typename PT>
cudaError_t backward_typed(const BackwardArgs& args, const CudaSchedule& s, int* sync, void* partial,
                           cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  const bool inner = args.x_strides.c == 1 && args.x_strides.p != 1;
  const bool packed = packable<V>(inner, args.c, args.p,
                                  {{args.grad_y, args.g_strides}, {args.x, args.x_strides},
                                   {args.dx, args.dx_strides}, {args.y, args.y_strides},
                                   {args.residual, args.residual_strides},
                                   {args.d_residual, args.d_residual_strides}});
  const bool tail = args.out_act != OutAct::kNone;
  return with_variant<V>(packed, inner, tail, [&](auto v, auto in, auto tl) {
    return launch(se_backward_kernel<T, PT, decltype(v)::value, decltype(in)::value, decltype(tl)::value>, args, s,
                  sync, static_cast<A*>(partial), shared_accumulator_bytes<A>(args.r), stream);
  });
}

template <typename Args, typename Fn>
cudaError_t dispatch_types(const Args& args, Fn&& fn) {
  const DType x = args.x_dtype, p = args.param_dtype;
  if (x == DType::kFloat && p == DType::kFloat) return fn(float{}, float{});
  if (x == DType::kDouble && p == DType::kDouble) return fn(double{}, double{});
  if (x == DType::kHalf && p == DType::kHalf) return fn(__half{}, __half{});
  if (x == DType::kHalf && p == DType::kFloat) return fn(__half{}, float{});
  if (x == DType::kBFloat16 && p == DType::kBFloat16) return fn(__nv_bfloat16{}, __nv_bfloat16{});
  if (x == DType::kBFloat16 && p == DType::kFloat) return fn(__nv_bfloat16{}, float{});
  return cudaErrorInvalidValue;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

CudaSchedule plan_cuda_schedule(int64_t n, int64_t c, int64_t r, int64_t p, bool channels_inner, int element_size,
                                int num_sms, int64_t l2_bytes, bool weight_grads, int force_split,
                                int64_t force_group_size, int64_t force_num_blocks) {
  CudaSchedule s{};
  s.wgrad_tiles = weight_grads ? static_cast<int>(ceil_div(c, kWeightGradTile) * ceil_div(r, kWeightGradTile)) : 0;
  s.block_c = channels_inner ? kBlockChannelsInner : kBlockChannelsRows;
  const int64_t channel_blocks = ceil_div(c, s.block_c);
  const int64_t resident = force_num_blocks > 0 ? force_num_blocks : static_cast<int64_t>(num_sms) * kBlocksPerSm;
  s.split = force_split >= 0 ? force_split == 1 : !(n >= resident && c * p * element_size <= kSampleBytesPerBlock);
  if (!s.split) {
    s.seg_len = p;
    s.num_segments = 1;
    s.items_per_sample = static_cast<int>(channel_blocks);
    s.group_size = 1;
    s.num_groups = static_cast<int>(n);
    s.num_tickets = static_cast<int>(n) + s.wgrad_tiles;  // the backward draws them; the forward runs a block a sample
    s.num_blocks = s.num_tickets;
    return s;
  }
  // Segments are multiples of 256 positions, so every pack width divides them.
  const int64_t unit = 256;
  int64_t seg = std::max<int64_t>(unit, ceil_div(kItemElements / s.block_c, unit) * unit);
  if (n * channel_blocks * ceil_div(p, seg) < 2 * resident) seg = unit;  // more, smaller items to fill the GPU
  s.seg_len = std::min(seg, ceil_div(p, unit) * unit);
  s.num_segments = static_cast<int>(ceil_div(p, s.seg_len));
  s.items_per_sample = static_cast<int>(channel_blocks * s.num_segments);
  // A group is at least one wave of reduce items; small samples make it larger, up to what two groups
  // in flight keep in half the L2 (the rescale re-reads x from there). A sample's MLP runs in the block
  // that finished its reduce, and a group's rescale waits for all of them: with one-wave groups, small
  // maps ran their groups' MLPs one group after another (128 x 2048 x 7 x 7: 15 groups of 9 samples).
  const int64_t sample_bytes = std::max<int64_t>(1, c * p * element_size);
  const int64_t group = force_group_size > 0
                            ? force_group_size
                            : std::max(ceil_div(resident, s.items_per_sample), l2_bytes / (4 * sample_bytes));
  s.group_size = static_cast<int>(std::min<int64_t>(n, group));
  s.num_groups = static_cast<int>(ceil_div(n, s.group_size));
  s.num_tickets = 2 * s.num_groups * s.group_size * s.items_per_sample + s.wgrad_tiles;
  s.num_blocks = static_cast<int>(std::min<int64_t>(resident, s.num_tickets));
  return s;
}

cudaError_t se_forward_cuda(const ForwardArgs& args, const CudaSchedule& schedule, int* sync, void* partial,
                            cudaStream_t stream) {
  return dispatch_types(args, [&](auto t, auto pt) {
    return forward_typed<decltype(t), decltype(pt)>(args, schedule, sync, partial, stream);
  });
}

cudaError_t se_backward_cuda(const BackwardArgs& args, const CudaSchedule& schedule, int* sync, void* partial,
                             cudaStream_t stream) {
  return dispatch_types(args, [&](auto t, auto pt) {
    return backward_typed<decltype(t), decltype(pt)>(args, schedule, sync, partial, stream);
  });
}

}  // namespace se_fused
