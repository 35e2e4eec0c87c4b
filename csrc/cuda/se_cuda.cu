// Fused SE CUDA kernels; the schedule is described in se_cuda.h.
#include "se_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../se_math.h"

namespace se_fused {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kBlockChannelsRows = 32;   // NCHW: channels per step of an item's walk (4 per warp)
constexpr int kBlockChannelsInner = 64;  // channels_last: channels per step (128 or 256 on short maps: the planner)
constexpr int64_t kItemElements = 16384;  // per split item: amortises its atomics and partial-sum store
constexpr int64_t kSampleBytesPerBlock = 128 * 1024;  // largest sample one block handles alone
constexpr int kBlocksPerSm = 2;  // the kernels' __launch_bounds__: at most 128 registers
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

__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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

// NCHW: the constants of a warp's N rows side by side, channels cw + j·kWarps (none past c1),
// each repeated over a pack's V elements.
template <int N, int V, typename Fn, typename K>
__device__ __forceinline__ void row_constants(const Fn& fn, int64_t cw, int64_t c1, K (&k)[N][V]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const int64_t c = cw + j * kWarps;
    const K kc = c < c1 ? fn.channel(c) : K{};
#pragma unroll
    for (int i = 0; i < V; ++i) k[j][i] = kc;
  }
}

// out[c] = Σ_{p in [p0, p1)} of the terms term.load(c, p, k, v) gives, for c in [c0, c1).
template <typename A, int V, bool CH_INNER, typename Term>
__device__ void reduce_item(const Term& term, int64_t c0, int64_t c1, int64_t p0, int64_t p1, int block_c, A* out) {
  using K = typename Term::Channel;
  if constexpr (!CH_INNER) {
    // A warp walks kLoads of the item's channels side by side (c, c + kWarps, ...): that many
    // loads in flight a lane however short the rows (a 56x56 segment is two steps of a warp, a 7x7
    // row one or two).
    constexpr int kRows = Term::kLoads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t cw = c0 + warp; cw < c1; cw += kRows * kWarps) {
      K k[kRows][V];
      row_constants(term, cw, c1, k);
      A acc[kRows] = {};
      for (int64_t p = p0 + lane * V; p < p1; p += 32 * V) {
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          if (cw + j * kWarps >= c1) continue;
          A v[V];
          term.load(cw + j * kWarps, p, k[j], v);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[j] += v[i];
        }
      }
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const A sum = warp_sum(acc[j]);
        if (lane == 0 && cw + j * kWarps < c1) out[cw + j * kWarps] = sum;
      }
    }
  } else {
    const int lanes_c = block_c / V;        // threads side by side along channels
    const int rows = kThreads / lanes_c;  // positions handled at once
    __shared__ A sums[kThreads * V];      // [rows][block_c]
    const int lane_c = threadIdx.x % lanes_c, row = threadIdx.x / lanes_c;
    const int64_t c = c0 + lane_c * V;
    A acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0;
    if (c < c1) {
      K k[V];
#pragma unroll
      for (int i = 0; i < V; ++i) k[i] = term.channel(c + i);
      // kLoads positions at once (a loop over a runtime stride is not unrolled by nvcc)
      for (int64_t p = p0 + row; p < p1; p += Term::kLoads * rows) {
        A v[Term::kLoads][V];
#pragma unroll
        for (int u = 0; u < Term::kLoads; ++u) {
          if (p + u * rows < p1) {
            term.load(c, p + u * rows, k, v[u]);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) v[u][i] = 0;
          }
        }
#pragma unroll
        for (int u = 0; u < Term::kLoads; ++u)
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += v[u][i];
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) sums[row * block_c + lane_c * V + i] = acc[i];
    __syncthreads();
    if (threadIdx.x < block_c && c0 + threadIdx.x < c1) {
      A sum = 0;
      for (int r = 0; r < rows; ++r) sum += sums[r * block_c + threadIdx.x];
      out[c0 + threadIdx.x] = sum;
    }
    __syncthreads();  // `sums` is reused by the next item
  }
}

// step.store(c, p, step.load(c, p), k) for every pack of the item, c in [c0, c1), p in [p0, p1).
// Each thread issues the loads of Step::kUnroll packs before its first store: the inputs and the
// output are not known not to alias, so a load → store → load loop keeps one load in flight per
// thread. NCHW: the packs of kUnroll channels side by side (a warp's rows; a segment of a row is
// only a step or two of a warp); channels_last: kUnroll rows of positions. Steps that read two or
// three tensors unroll less: about as many bytes in flight, fewer registers (at 4, ptxas spilled
// the tail's forward).
template <int V, bool CH_INNER, typename Step>
__device__ void rescale_item(const Step& step, int64_t c0, int64_t c1, int64_t p0, int64_t p1, int block_c) {
  constexpr int kUnroll = Step::kUnroll;
  using K = typename Step::Channel;
  using L = typename Step::Loaded;
  if constexpr (!CH_INNER) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t cw = c0 + warp; cw < c1; cw += kUnroll * kWarps) {
      K k[kUnroll][V];
      row_constants(step, cw, c1, k);
      for (int64_t p = p0 + lane * V; p < p1; p += 32 * V) {
        L raw[kUnroll] = {};  // initialised: with packs left unset, ptxas kept the array in local memory
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (cw + u * kWarps < c1) raw[u] = step.load(cw + u * kWarps, p);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (cw + u * kWarps < c1) step.store(cw + u * kWarps, p, raw[u], k[u]);
        }
      }
    }
  } else {
    const int lanes_c = block_c / V;
    const int rows = kThreads / lanes_c;
    const int lane_c = threadIdx.x % lanes_c, row = threadIdx.x / lanes_c;
    const int64_t c = c0 + lane_c * V;
    if (c >= c1) return;
    K k[V];
#pragma unroll
    for (int i = 0; i < V; ++i) k[i] = step.channel(c + i);
    for (int64_t p = p0 + row; p < p1; p += kUnroll * rows) {
      L raw[kUnroll] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (p + u * rows < p1) raw[u] = step.load(c, p + u * rows);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (p + u * rows < p1) step.store(c, p + u * rows, raw[u], k);
      }
    }
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
  static constexpr int kLoads = 4;  // packs a lane loads before it sums them (NCHW: rows side by side)
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
  static constexpr int kLoads = TAIL ? 1 : 2;  // packs of g and x at once: 4 loads a lane (the tail's 2-3)
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
    Loaded l{};  // packs it does not load are zero, never read
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
  // The tail's step reads three tensors (48 bytes a thread); unrolled twice, ptxas spilled inside
  // the channels_last loop under the kernels' 128-register bound.
  static constexpr int kUnroll = TAIL ? 1 : 4;
  SampleView<const T> g, u, residual;  // u: the tail's y (ReLU) or x (SiLU); residual base null: none
  SampleView<T> dx;
  const A* e;
  const A* dzp;
  Gate gate;
  OutAct out_act;
  __device__ Channel channel(int64_t c) const { return {gate_fn(__ldcg(e + c), gate), __ldcg(dzp + c)}; }
  __device__ Loaded load(int64_t c, int64_t p) const {
    Loaded l{};  // packs it does not load are zero, never read
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

// ----------------------------------------------------------------------------- MLP tiles
// A tile is out[m][j] = Σ_k L(m, k) B(k, j) for kMlpSamples samples m and kMlpOutputs outputs j:
// the weights B are read once per tile, 16 bytes a load, instead of once per sample. Each warp
// takes every kWarps-th step of kMlpK k values (split K; operands staged in shared memory, 4x4
// outputs a lane), and the warps' partial tiles are added in warp order: deterministic, and a
// sample's result does not depend on the group it is in.
//
// fc1 (K = C, long) is also split across tiles, fc1_splits ranges of at most kMlpSplitK channels:
// a warp then walks at most kMlpSplitK / (kWarps · kMlpK) steps, each an L2 round trip. The fc1
// tiles store their sums as partial rows; fc2's left operand adds a sample's rows in order (as z
// adds the partial sums of a sample's segments), finishes them (+ b1, or act'(a) ·) and stores the
// result (a, or da) once, from the tiles of output block 0.

// The four products of the MLP, named by their left operand L, each the sum of a sample's
// partial rows (row (n · rows + i) of K), finished:
enum class Lhs {
  kPooled,      // forward fc1: z = Σ / P (stored); B = W1ᵀ; out: rows of a - b1
  kHidden,      // forward fc2: act(a), a = Σ + b1 (stored); B = W2ᵀ; out e = · + b2
  kGateGrad,    // backward fc1: de = gate'(e) · Σ (stored); B = W2; out: rows of dh = de W2
  kHiddenGrad,  // backward fc2: da = act'(a) · Σ (stored); B = W1; out dz/P = · / P
};

// One product's operands, passed by value to the (not inlined) tile function.
template <typename A, typename PT>
struct MlpProduct {
  const A* rows;      // the partial rows L sums: partial sums (fc1), the fc1 tiles' rows (fc2)
  int num_rows;       // per sample: segments (fc1), fc1 splits (fc2)
  const A* aux;       // kGateGrad: e; kHiddenGrad: a
  const PT* bias_in;  // kHidden: b1 (may be null)
  A* lhs_out;         // z, a, de or da (written by the tiles of output block 0)
  const PT* w;        // B(k, j) = w[k · w_k + j · w_j]
  int64_t w_k, w_j;
  int64_t k, j;       // K, J
  const PT* bias;     // kHidden: b2 (may be null)
  A* out;             // fc1: rows (n · out_rows + split) of J; fc2: rows of J
  int out_rows;       // fc1: the splits; fc2: 1
  int64_t split_k;    // fc1: channels per split
  int64_t p;          // positions
  Act act;
  Gate gate;
};

constexpr int kMlpK = 8;  // k values per step of a warp: 4 of L and a row of 8 weights a lane
constexpr int kMlpStage = kMlpK * (kMlpSamples + kMlpOutputs);  // values a warp stages per step
constexpr int kMlpTileValues = kMlpSamples * kMlpOutputs;
static_assert(kMlpSamples * kMlpK == 4 * 32 && kMlpOutputs == 32, "a lane stages 4 values of L and 8 of W");
static_assert(kMlpSplitK % (kWarps * kMlpK) == 0, "a split is whole steps of every warp");

// Shared memory of an MLP tile, in bytes (the kernels' dynamic shared memory): the warps' staging
// areas, then the same bytes for their partial tiles.
template <typename A>
constexpr size_t mlp_smem_bytes() {
  return kWarps * std::max(kMlpStage, kMlpTileValues) * sizeof(A);
}

// L(m, k) of sample m; `store`: write it (z, a, de, da) too. Rows written in this launch are read
// through L2 (__ldcg).
template <Lhs KIND, typename A, typename PT>
__device__ __forceinline__ A lhs_value(const MlpProduct<A, PT>& q, int64_t m, int64_t k, bool store) {
  A sum = 0;
  for (int i = 0; i < q.num_rows; ++i) sum += __ldcg(q.rows + (m * q.num_rows + i) * q.k + k);
  A v;
  if constexpr (KIND == Lhs::kPooled) v = sum / static_cast<A>(q.p);
  else if constexpr (KIND == Lhs::kHidden) v = q.bias_in ? sum + to_acc(q.bias_in[k]) : sum;
  else if constexpr (KIND == Lhs::kGateGrad) v = gate_backward(sum, q.aux[m * q.k + k], q.gate);
  else v = activation_backward(sum, q.aux[m * q.k + k], q.act);
  if (store) q.lhs_out[m * q.k + k] = v;
  if constexpr (KIND == Lhs::kHidden) v = activation(v, q.act);
  return v;
}

// Elements of a row of 8 that lie before its end, `remaining` elements away.
__device__ __forceinline__ int row_length(int64_t remaining) {
  return remaining <= 0 ? 0 : remaining >= 8 ? 8 : static_cast<int>(remaining);
}

// count (<= 8) consecutive elements along a weight's row, 0 past count: 16-byte loads when `vec`
// (unit stride, 16-byte aligned) and the row is whole.
template <typename PT, typename A>
__device__ __forceinline__ void load_weights8(const PT* p, int64_t stride, int count, bool vec, A* out) {
  constexpr int VP = 16 / sizeof(PT);
  if (vec && count == 8) {
#pragma unroll
    for (int i = 0; i < 8; i += VP) {
      A t[VP];
      load_pack<PT, VP>(p + i, t);
#pragma unroll
      for (int u = 0; u < VP; ++u) out[i + u] = t[u];
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = i < count ? to_acc(p[i * stride]) : A(0);
  }
}

// Four values from shared memory (16-byte aligned) as 16-byte loads.
template <typename A>
__device__ __forceinline__ void load_shared4(const A* p, A (&out)[4]) {
  constexpr int V = 16 / sizeof(A);
#pragma unroll
  for (int i = 0; i < 4; i += V) {
    const Pack<A, V> pk = *reinterpret_cast<const Pack<A, V>*>(p + i);
#pragma unroll
    for (int u = 0; u < V; ++u) out[i + u] = pk.v[u];
  }
}

// Not inlined: the tile code is compiled once per product and type pair, not into each of the
// kernels' streaming variants (compile time), and its registers stay within the kernels' bound.
// A warp's step: its loads, then its FMAs; the latency is hidden by the other warps and blocks
// (a register prefetch of the next step spilled under the 128-register bound).
template <Lhs KIND, typename A, typename PT>
__device__ __noinline__ void mlp_tile(const MlpProduct<A, PT> q, int64_t m0, int64_t m1, int64_t j0, int split,
                                      A* smem) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A* lhs_s = smem + warp * kMlpStage;       // [kMlpK][kMlpSamples]
  A* rhs_s = lhs_s + kMlpK * kMlpSamples;   // [kMlpK][kMlpOutputs]
  const bool store_lhs = q.lhs_out != nullptr && j0 == 0;
  // W's rows of 8 run along k (w_k == 1) or along j (w_j == 1, or neither: element by element).
  const bool along_k = q.w_k == 1;
  constexpr int VP = 16 / sizeof(PT);
  const bool vec = (along_k ? q.w_j % VP == 0 : q.w_j == 1 && q.w_k % VP == 0) && aligned16(q.w);
  // Staged by this lane: L at sample lm, k values lk, +4; W's row of 8 along k (output j0 + lane)
  // or along j (k value lane / 4, outputs 8 (lane % 4), +8).
  const int lm = lane / 2, lk = (lane % 2) * 4;
  const int64_t m = m0 + lm;
  // Computed by this lane: samples 4 mg, +4 and outputs 4 jg, +4.
  const int mg = lane / 8, jg = lane % 8;
  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[i][u] = 0;
  const int64_t k_begin = split * q.split_k, k_end = min(q.k, k_begin + q.split_k);
  for (int64_t k0 = k_begin + warp * kMlpK; k0 < k_end; k0 += kWarps * kMlpK) {
    A lv[4], rv[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t k = k0 + lk + i;
      lv[i] = m < m1 && k < k_end ? lhs_value<KIND>(q, m, k, store_lhs) : A(0);
    }
    if (along_k) {
      const int64_t j = j0 + lane;
      load_weights8(q.w + j * q.w_j + k0 * q.w_k, q.w_k, j < q.j ? row_length(k_end - k0) : 0, vec, rv);
    } else {
      const int64_t k = k0 + lane / 4, j = j0 + 8 * (lane % 4);
      load_weights8(q.w + k * q.w_k + j * q.w_j, q.w_j, k < k_end ? row_length(q.j - j) : 0, vec, rv);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) lhs_s[(lk + i) * kMlpSamples + lm] = lv[i];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (along_k) rhs_s[i * kMlpOutputs + lane] = rv[i];
      else rhs_s[(lane / 4) * kMlpOutputs + 8 * (lane % 4) + i] = rv[i];
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kMlpK; ++k) {
      A l[4], r[4];
      load_shared4(lhs_s + k * kMlpSamples + 4 * mg, l);
      load_shared4(rhs_s + k * kMlpOutputs + 4 * jg, r);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[i][u] += l[i] * r[u];
    }
    __syncwarp();  // the next step's staging overwrites what this one read
  }
  __syncthreads();  // every warp is done with its staging area, which the partial tiles reuse
  A* partial_tiles = smem;  // [kWarps][kMlpSamples][kMlpOutputs]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int u = 0; u < 4; ++u) partial_tiles[(warp * kMlpSamples + 4 * mg + i) * kMlpOutputs + 4 * jg + u] = acc[i][u];
  __syncthreads();
  for (int o = threadIdx.x; o < kMlpTileValues; o += kThreads) {
    const int64_t mo = m0 + o / kMlpOutputs, j = j0 + o % kMlpOutputs;
    if (mo >= m1 || j >= q.j) continue;
    A v = 0;
    for (int w = 0; w < kWarps; ++w) v += partial_tiles[w * kMlpTileValues + o];
    if constexpr (KIND == Lhs::kHidden) {
      if (q.bias) v += to_acc(q.bias[j]);
    } else if constexpr (KIND == Lhs::kHiddenGrad) {
      v = v / static_cast<A>(q.p);
    }
    q.out[(mo * q.out_rows + split) * q.j + j] = v;
  }
  __syncthreads();  // the next tile's staging reuses the shared memory
}

// MLP tile `tile` of a product with J outputs over the group's samples [n0, n1): output block
// tile mod ⌈J / kMlpOutputs⌉, then the split, then the chunk of kMlpSamples samples.
template <Lhs KIND, typename A, typename PT>
__device__ __forceinline__ void run_mlp_tile(const MlpProduct<A, PT>& q, int tile, int64_t n0, int64_t n1, A* smem) {
  const int j_tiles = static_cast<int>(ceil_div(q.j, kMlpOutputs));
  const int jt = tile % j_tiles, split = tile / j_tiles % q.out_rows, chunk = tile / j_tiles / q.out_rows;
  const int64_t m0 = n0 + static_cast<int64_t>(chunk) * kMlpSamples;
  if (m0 >= n1) return;  // a short last group's chunk beyond it
  mlp_tile<KIND>(q, m0, min(n1, m0 + kMlpSamples), static_cast<int64_t>(jt) * kMlpOutputs, split, smem);
}

// Block-wide: thread 0 draws a ticket, everyone gets it.
__device__ int draw_ticket(int* ticket) {
  __shared__ int drawn;
  __syncthreads();  // everyone has read the previous `drawn`
  if (threadIdx.x == 0) drawn = atomicAdd(ticket, 1);
  __syncthreads();
  return drawn;
}

// After a piece of work whose results later tickets read: they are visible device-wide, then the
// counter counts it.
__device__ void arrive(int* counter) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(counter, 1);
}

// After a piece of work nothing in this launch reads (a rescale item, a weight-gradient tile): the
// counter counts it, and its last user (the count reaching `total`) zeroes it for the next launch.
__device__ void arrive_last(int* counter, int total) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(counter, 1) == total - 1) atomicExch(counter, 0);
}

// Before work that reads what others counted: the counter has reached `target`, and what they
// wrote is visible.
__device__ void wait_count(int* counter, int target) {
  if (threadIdx.x == 0) {
    while (atomicAdd(counter, 0) < target) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
}

__device__ void retire(int* ticket, int last_ticket, int num_tickets) {
  if (threadIdx.x == 0 && last_ticket == num_tickets + static_cast<int>(gridDim.x) - 1) atomicExch(ticket, 0);
}

// Runs the schedule of se_cuda.h; `ops` supplies the work:
//   ops.reduce(n, c0, c1, p0, p1, out)   per-channel sums of channels [c0, c1) into out[c]
//   ops.fc1(tile, n0, n1), ops.fc2(...)  MLP tiles over the group's samples [n0, n1)
//   ops.rescale(n, c0, c1, p0, p1)       the elementwise output of that item
//   ops.weight_grads(tile)               one tile of the weight gradients, summed over the batch
//                                        (backward: Ops::kWeightGrads)
// sync: the ticket counter, the batch counter, one counter per group.
template <typename Ops, typename A>
__device__ void run_schedule(const CudaSchedule& s, int64_t N, int64_t C, int64_t P, int* sync, A* partial,
                             Ops& ops) {
  int* ticket_counter = sync;
  int* batch = sync + 1;
  int* group_counters = sync + 2;
  const int mlps_done = s.num_groups * s.fc2_tiles;  // the batch counter once every group's MLP is done
  int ticket;
  while ((ticket = draw_ticket(ticket_counter)) < s.num_tickets) {
    const Work w = locate_work(ticket, s, N, C, P);
    int* counter = group_counters + w.group;
    switch (w.phase) {
      case Phase::kReduce:
        if (w.n >= N) break;  // a short last group
        for (int64_t c0 = w.c0; c0 < w.c1; c0 += s.block_c) {
          ops.reduce(w.n, c0, min(w.c1, c0 + s.block_c), w.p0, w.p1, partial + (w.n * s.num_segments + w.seg) * C);
        }
        arrive(counter);
        break;
      case Phase::kFc1:
        wait_count(counter, w.reduced);
        ops.fc1(w.index, w.n0, w.n1);
        arrive(counter);
        break;
      case Phase::kFc2:
        wait_count(counter, w.reduced + s.fc1_tiles);
        ops.fc2(w.index, w.n0, w.n1);
        arrive(counter);
        if (s.wgrad_tiles) arrive(batch);
        break;
      case Phase::kRescale:
        if (w.n >= N) break;
        wait_count(counter, w.excited);
        for (int64_t c0 = w.c0; c0 < w.c1; c0 += s.block_c) ops.rescale(w.n, c0, min(w.c1, c0 + s.block_c), w.p0, w.p1);
        arrive_last(counter, w.excited + w.reduced);
        break;
      case Phase::kWeightGrads:
        if constexpr (Ops::kWeightGrads) {
          wait_count(batch, mlps_done);
          ops.weight_grads(w.index);
          arrive_last(batch, mlps_done + s.wgrad_tiles);
        }
        break;
    }
  }
  retire(ticket_counter, ticket, s.num_tickets);
}

// Forward: reduce x, the MLP tiles (z, a, e), rescale y = x * gate(e), or out_act(x * gate(e) +
// residual) with the residual tail (TAIL).
template <typename T, typename PT, int V, bool CH_INNER, bool TAIL>
struct ForwardOps {
  using A = acc_t<T>;
  static constexpr bool kWeightGrads = false;  // the forward plans no weight-gradient tiles
  const ForwardArgs& args;
  const A* partial;
  int num_segments;
  A* mlp_rows;  // the fc1 tiles' partial rows
  int fc1_splits;
  A* smem;      // the MLP tiles' shared memory
  int block_c;  // channels a walker step covers (channels_last: lanes along channels x V)

  __device__ SampleView<const T> x(int64_t n) const { return sample_view<const T>(args.x, args.x_strides, n); }
  __device__ void reduce(int64_t n, int64_t c0, int64_t c1, int64_t p0, int64_t p1, A* out) const {
    reduce_item<A, V, CH_INNER>(SumOfX<T, A, V>{x(n)}, c0, c1, p0, p1, block_c, out);
  }
  __device__ void fc1(int tile, int64_t n0, int64_t n1) const {
    const MlpProduct<A, PT> q{partial, num_segments, nullptr, nullptr, static_cast<A*>(args.z),
                              static_cast<const PT*>(args.w1), args.w1_stride_c, args.w1_stride_r, args.c, args.r,
                              nullptr, mlp_rows, fc1_splits, kMlpSplitK, args.p, args.act, args.gate};
    run_mlp_tile<Lhs::kPooled>(q, tile, n0, n1, smem);
  }
  __device__ void fc2(int tile, int64_t n0, int64_t n1) const {
    const MlpProduct<A, PT> q{mlp_rows,   fc1_splits, nullptr, static_cast<const PT*>(args.b1),
                              static_cast<A*>(args.a), static_cast<const PT*>(args.w2), args.w2_stride_r,
                              args.w2_stride_c, args.r, args.c, static_cast<const PT*>(args.b2),
                              static_cast<A*>(args.e), 1, args.r, args.p, args.act, args.gate};
    run_mlp_tile<Lhs::kHidden>(q, tile, n0, n1, smem);
  }
  __device__ void rescale(int64_t n, int64_t c0, int64_t c1, int64_t p0, int64_t p1) const {
    const ScaleForward<T, A, V, TAIL> step{x(n), optional_view<const T>(args.residual, args.residual_strides, n),
                                           sample_view<T>(args.y, args.y_strides, n),
                                           static_cast<const A*>(args.e) + n * args.c, args.gate, args.out_act};
    rescale_item<V, CH_INNER>(step, c0, c1, p0, p1, block_c);
  }
};

// The weight-gradient tiles' operands, by value to the (not inlined) tile function: a reference to
// the kernel's arguments would copy all of them to its stack.
template <typename A, typename PT>
struct WeightGrads {
  const A* de;  // (N, C) and (N, R): written by this launch's MLP tiles
  const A* da;
  const A* z;   // (N, C) and (N, R): the forward's
  const A* a;
  PT* dw1;      // (R, C), (C, R) with strides; db1, db2 may be null
  PT* dw2;
  PT* db1;
  PT* db2;
  int64_t n, c, r;
  int64_t dw1_stride_r, dw1_stride_c, dw2_stride_c, dw2_stride_r;
  Act act;
};

constexpr int kWeightGradSamples = 4;  // samples whose loads a weight-gradient tile has in flight at once

// One tile of the weight gradients, the backward's last tickets: dW2 = deᵀ act(a), dW1 = daᵀ z,
// db2 = Σ de, db1 = Σ da, summed over n in order (deterministic). Tile t covers channels
// [32 (t mod ⌈C/32⌉), +32) and hidden units [32 ⌊t / ⌈C/32⌉⌋, +32); thread (tx, ty) owns channel tx
// and rows ty, ty+8, ... of the tile. Loads of kWeightGradSamples samples come before their sums: a
// loop of one sample at a time was a chain of N dependent L2 round trips. The first row of tiles
// sums db2 (threads ty = 0), the first column db1 (threads tx = 0).
template <typename A, typename PT>
__device__ __noinline__ void weight_grad_tile(const WeightGrads<A, PT> q, int tile) {
  constexpr int kTile = kWeightGradTile, kRows = kTile / kWarps, kS = kWeightGradSamples;
  const int64_t C = q.c, R = q.r;
  const int channel_tiles = static_cast<int>(ceil_div(C, kTile));
  const int64_t c_tile = tile % channel_tiles, r_tile = tile / channel_tiles;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t c = c_tile * kTile + tx;
  A dw2[kRows] = {}, dw1[kRows] = {}, db1[kRows] = {}, db2 = 0;
  for (int64_t n0 = 0; n0 < q.n; n0 += kS) {
    A de_v[kS], z_v[kS], h_v[kS][kRows], da_v[kS][kRows];
#pragma unroll
    for (int u = 0; u < kS; ++u) {
      const int64_t n = n0 + u;
      const bool on_c = n < q.n && c < C;
      de_v[u] = on_c ? __ldcg(q.de + n * C + c) : A(0);
      z_v[u] = on_c ? q.z[n * C + c] : A(0);
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        const int64_t r = r_tile * kTile + ty + k * kWarps;
        const bool on_r = n < q.n && r < R;
        h_v[u][k] = on_r ? activation(q.a[n * R + r], q.act) : A(0);
        da_v[u][k] = on_r ? __ldcg(q.da + n * R + r) : A(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kS; ++u) {
      if (n0 + u >= q.n) break;
      db2 += de_v[u];
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        dw2[k] += de_v[u] * h_v[u][k];
        dw1[k] += z_v[u] * da_v[u][k];
        db1[k] += da_v[u][k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    const int64_t r = r_tile * kTile + ty + k * kWarps;
    if (c < C && r < R) {
      from_acc(dw2[k], q.dw2[c * q.dw2_stride_c + r * q.dw2_stride_r]);
      from_acc(dw1[k], q.dw1[r * q.dw1_stride_r + c * q.dw1_stride_c]);
    }
    if (q.db1 && c_tile == 0 && tx == 0 && r < R) from_acc(db1[k], q.db1[r]);
  }
  if (q.db2 && r_tile == 0 && ty == 0 && c < C) from_acc(db2, q.db2[c]);
}

// Backward: reduce dt·x, the MLP tiles (de, da, dz/P), rescale dx = dt * gate(e) + dz/P, where dt
// is grad_y, or with the residual tail (TAIL) the gradient at its input, written as d_residual.
template <typename T, typename PT, int V, bool CH_INNER, bool TAIL>
struct BackwardOps {
  using A = acc_t<T>;
  static constexpr bool kWeightGrads = true;
  const BackwardArgs& args;
  const A* partial;
  int num_segments;
  A* mlp_rows;  // the fc1 tiles' partial rows
  int fc1_splits;
  A* smem;      // the MLP tiles' shared memory
  int block_c;  // channels a walker step covers (channels_last: lanes along channels x V)

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
    reduce_item<A, V, CH_INNER>(term, c0, c1, p0, p1, block_c, out);
  }
  __device__ void fc1(int tile, int64_t n0, int64_t n1) const {
    const MlpProduct<A, PT> q{partial, num_segments, static_cast<const A*>(args.e), nullptr, static_cast<A*>(args.de),
                              static_cast<const PT*>(args.w2), args.w2_stride_c, args.w2_stride_r, args.c, args.r,
                              nullptr, mlp_rows, fc1_splits, kMlpSplitK, args.p, args.act, args.gate};
    run_mlp_tile<Lhs::kGateGrad>(q, tile, n0, n1, smem);
  }
  __device__ void fc2(int tile, int64_t n0, int64_t n1) const {
    const MlpProduct<A, PT> q{mlp_rows, fc1_splits, static_cast<const A*>(args.a), nullptr, static_cast<A*>(args.da),
                              static_cast<const PT*>(args.w1), args.w1_stride_r, args.w1_stride_c, args.r, args.c,
                              nullptr, static_cast<A*>(args.dzp), 1, args.r, args.p, args.act, args.gate};
    run_mlp_tile<Lhs::kHiddenGrad>(q, tile, n0, n1, smem);
  }
  __device__ void weight_grads(int tile) const {
    const WeightGrads<A, PT> q{static_cast<const A*>(args.de), static_cast<const A*>(args.da),
                               static_cast<const A*>(args.z), static_cast<const A*>(args.a),
                               static_cast<PT*>(args.dw1), static_cast<PT*>(args.dw2), static_cast<PT*>(args.db1),
                               static_cast<PT*>(args.db2), args.n, args.c, args.r, args.dw1_stride_r,
                               args.dw1_stride_c, args.dw2_stride_c, args.dw2_stride_r, args.act};
    weight_grad_tile(q, tile);
  }
  __device__ void rescale(int64_t n, int64_t c0, int64_t c1, int64_t p0, int64_t p1) const {
    if (!args.dx) return;
    const bool relu = args.out_act == OutAct::kRelu;
    const ScaleBackward<T, A, V, TAIL> step{
        view(args.grad_y, args.g_strides, n),
        relu ? view(args.y, args.y_strides, n) : view(args.x, args.x_strides, n),
        optional_view<const T>(args.residual, args.residual_strides, n), sample_view<T>(args.dx, args.dx_strides, n),
        static_cast<const A*>(args.e) + n * args.c, static_cast<const A*>(args.dzp) + n * args.c, args.gate,
        args.out_act};
    rescale_item<V, CH_INNER>(step, c0, c1, p0, p1, block_c);
  }
};

template <typename T, typename PT, int V, bool CH_INNER, bool TAIL>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    se_forward_kernel(ForwardArgs args, CudaSchedule s, int* sync, acc_t<T>* partial) {
  extern __shared__ __align__(16) unsigned char smem[];
  ForwardOps<T, PT, V, CH_INNER, TAIL> ops{args, partial, s.num_segments, partial + mlp_rows_offset(s, args.n, args.c),
                                           s.fc1_splits, reinterpret_cast<acc_t<T>*>(smem), s.block_c};
  run_schedule(s, args.n, args.c, args.p, sync, partial, ops);
}

template <typename T, typename PT, int V, bool CH_INNER, bool TAIL>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    se_backward_kernel(BackwardArgs args, CudaSchedule s, int* sync, acc_t<T>* partial) {
  extern __shared__ __align__(16) unsigned char smem[];
  BackwardOps<T, PT, V, CH_INNER, TAIL> ops{args, partial, s.num_segments, partial + mlp_rows_offset(s, args.n, args.c),
                                            s.fc1_splits, reinterpret_cast<acc_t<T>*>(smem), s.block_c};
  run_schedule(s, args.n, args.c, args.p, sync, partial, ops);
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

template <typename Args, typename A>
using Kernel = void (*)(Args, CudaSchedule, int*, A*);

template <typename Args, typename A>
cudaError_t launch(Kernel<Args, A> kernel, size_t smem, const Args& args, const CudaSchedule& s, int* sync,
                   void* partial, cudaStream_t stream) {
  kernel<<<s.num_blocks, kThreads, smem, stream>>>(args, s, sync, static_cast<A*>(partial));
  return cudaGetLastError();
}

// Blocks of `kernel` one SM of the current device holds at once (its registers, shared memory and
// thread limits), asked of the runtime once per device and kernel.
template <typename Args, typename A>
cudaError_t resident_blocks(Kernel<Args, A> kernel, size_t smem, int* blocks) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> known;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
    if (const auto it = known.find(key); it != known.end()) {
      *blocks = it->second;
      return cudaSuccess;
    }
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, smem);
    if (err == cudaSuccess) known[key] = *blocks;
  }
  if (err != cudaSuccess) (void)cudaGetLastError();  // the caller raises it: no stale error for the next op
  return err;
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

// fn(kernel, its dynamic shared memory) with the forward kernel these arguments take: (pack width,
// layout, tail) for one (x dtype, parameter dtype) pair.
template <typename T, typename PT, typename Fn>
cudaError_t with_forward_kernel(const ForwardArgs& args, Fn&& fn) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  const bool inner = args.x_strides.c == 1 && args.x_strides.p != 1;
  const bool packed = packable<V>(inner, args.c, args.p,
                                  {{args.x, args.x_strides}, {args.y, args.y_strides},
                                   {args.residual, args.residual_strides}});
  const bool tail = args.residual != nullptr || args.out_act != OutAct::kNone;
  return with_variant<V>(packed, inner, tail, [&](auto v, auto in, auto tl) {
    return fn(se_forward_kernel<T, PT, decltype(v)::value, decltype(in)::value, decltype(tl)::value>,
              mlp_smem_bytes<A>());
  });
}

template <typename T, typename PT, typename Fn>
cudaError_t with_backward_kernel(const BackwardArgs& args, Fn&& fn) {
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
    return fn(se_backward_kernel<T, PT, decltype(v)::value, decltype(in)::value, decltype(tl)::value>,
              mlp_smem_bytes<A>());
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

__host__ __device__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace

// Ticket -> work, in the order of se_cuda.h: R(0) | M1(0) M2(0) R(1) S(0) | ... | M1 M2 S(last) | W.
__host__ __device__ Work locate_work(int ticket, const CudaSchedule& s, int64_t n, int64_t c, int64_t p) {
  const int group_items = s.group_size * s.items_per_sample;
  const int mlp_tiles = s.fc1_tiles + s.fc2_tiles;
  const int round_len = mlp_tiles + 2 * group_items;
  Work w{};
  if (ticket < group_items) {
    w.phase = Phase::kReduce, w.group = 0, w.index = ticket;
  } else if (ticket >= s.num_groups * round_len) {
    w.phase = Phase::kWeightGrads, w.group = 0, w.index = ticket - s.num_groups * round_len;
  } else {
    const int u = ticket - group_items;
    const int k = u / round_len + 1;           // round k: group k - 1's MLP and rescale, group k's reduce
    const int o = u % round_len - mlp_tiles;  // offset past the round's MLP tiles
    if (o < -s.fc2_tiles) {
      w.phase = Phase::kFc1, w.group = k - 1, w.index = o + mlp_tiles;
    } else if (o < 0) {
      w.phase = Phase::kFc2, w.group = k - 1, w.index = o + s.fc2_tiles;
    } else if (k < s.num_groups && o < group_items) {
      w.phase = Phase::kReduce, w.group = k, w.index = o;
    } else {
      w.phase = Phase::kRescale, w.group = k - 1, w.index = k < s.num_groups ? o - group_items : o;
    }
  }
  w.n0 = static_cast<int64_t>(w.group) * s.group_size;
  w.n1 = min64(n, w.n0 + s.group_size);
  w.reduced = static_cast<int>(w.n1 - w.n0) * s.items_per_sample;
  w.excited = w.reduced + mlp_tiles;
  const int item = w.index % s.items_per_sample;
  w.n = w.n0 + w.index / s.items_per_sample;
  w.seg = item % s.num_segments;
  w.c0 = static_cast<int64_t>(item / s.num_segments) * s.item_c;
  w.c1 = min64(c, w.c0 + s.item_c);
  w.p0 = w.seg * s.seg_len;
  w.p1 = min64(p, w.p0 + s.seg_len);
  return w;
}

CudaSchedule plan_cuda_schedule(int64_t n, int64_t c, int64_t r, int64_t p, bool channels_inner, int element_size,
                                int num_sms, int blocks_per_sm, int64_t l2_bytes, bool weight_grads, int force_split,
                                int64_t force_group_size, int64_t force_num_blocks) {
  CudaSchedule s{};
  s.wgrad_tiles = weight_grads ? static_cast<int>(ceil_div(c, kWeightGradTile) * ceil_div(r, kWeightGradTile)) : 0;
  s.block_c = channels_inner ? kBlockChannelsInner : kBlockChannelsRows;
  if (channels_inner) {
    // Short maps: wider steps while a thread still walks at most 8 positions (its rows are
    // kThreads x V / block_c apart, V the elements of 16 bytes): at 64 channels a step, a 7x7 map
    // gave a thread 1-2 positions, a step of loads and two barriers each.
    const int64_t v = 16 / element_size;
    while (s.block_c < 256 && 2 * s.block_c <= c && 2 * s.block_c * p <= 8 * kThreads * v) s.block_c *= 2;
  }
  const int64_t channel_blocks = ceil_div(c, s.block_c);
  const int64_t resident = force_num_blocks > 0 ? force_num_blocks : static_cast<int64_t>(num_sms) * std::max(1, blocks_per_sm);
  s.split = force_split >= 0 ? force_split == 1 : !(n >= resident && c * p * element_size <= kSampleBytesPerBlock);
  if (s.split) {  // items of a block of channels and a segment of positions
    // Segments are multiples of 256 positions, so every pack width divides them.
    const int64_t unit = 256;
    int64_t seg = std::max<int64_t>(unit, ceil_div(kItemElements / s.block_c, unit) * unit);
    if (n * channel_blocks * ceil_div(p, seg) < 2 * resident) seg = unit;  // more, smaller items to fill the GPU
    s.seg_len = std::min(seg, ceil_div(p, unit) * unit);
    // Short maps: an item takes several blocks of channels, up to kItemElements, as long as there
    // stay two items a resident block (a ticket, a fence and two atomics over more bytes: a 7x7
    // item of one block of channels was 64 x 49 elements).
    const int64_t block_elements = s.block_c * std::min(p, s.seg_len);
    const int64_t blocks = std::min(std::max<int64_t>(1, kItemElements / block_elements),
                                    std::max<int64_t>(1, n * channel_blocks * ceil_div(p, s.seg_len) / (2 * resident)));
    s.item_c = static_cast<int>(std::min(channel_blocks, blocks) * s.block_c);
  } else {  // an item a sample
    s.seg_len = p;
    s.item_c = static_cast<int>(channel_blocks * s.block_c);
  }
  s.num_segments = static_cast<int>(ceil_div(p, s.seg_len));
  s.items_per_sample = static_cast<int>(ceil_div(c, s.item_c) * s.num_segments);
  // A group is at least one wave of reduce items; small samples make it larger, up to what two groups
  // in flight keep in half the L2 (the rescale re-reads x from there). Larger groups also give the
  // MLP more tiles to spread over the GPU (128 x 2048 x 7 x 7 on H200: 75 samples, 20 fc1 tiles).
  const int64_t sample_bytes = std::max<int64_t>(1, c * p * element_size);
  const int64_t group = force_group_size > 0
                            ? force_group_size
                            : std::max(ceil_div(resident, s.items_per_sample), l2_bytes / (4 * sample_bytes));
  s.group_size = static_cast<int>(std::min<int64_t>(n, group));
  s.num_groups = static_cast<int>(ceil_div(n, s.group_size));
  const int64_t chunks = ceil_div(s.group_size, kMlpSamples);
  s.fc1_splits = static_cast<int>(ceil_div(c, kMlpSplitK));
  s.fc1_tiles = static_cast<int>(chunks * s.fc1_splits * ceil_div(r, kMlpOutputs));
  s.fc2_tiles = static_cast<int>(chunks * ceil_div(c, kMlpOutputs));
  s.num_tickets = s.num_groups * (s.fc1_tiles + s.fc2_tiles + 2 * s.group_size * s.items_per_sample) + s.wgrad_tiles;
  s.num_blocks = static_cast<int>(std::min<int64_t>(resident, s.num_tickets));
  return s;
}

cudaError_t se_forward_cuda(const ForwardArgs& args, const CudaSchedule& schedule, int* sync, void* partial,
                            cudaStream_t stream) {
  return dispatch_types(args, [&](auto t, auto pt) {
    return with_forward_kernel<decltype(t), decltype(pt)>(
        args, [&](auto kernel, size_t smem) { return launch(kernel, smem, args, schedule, sync, partial, stream); });
  });
}

cudaError_t se_backward_cuda(const BackwardArgs& args, const CudaSchedule& schedule, int* sync, void* partial,
                             cudaStream_t stream) {
  return dispatch_types(args, [&](auto t, auto pt) {
    return with_backward_kernel<decltype(t), decltype(pt)>(
        args, [&](auto kernel, size_t smem) { return launch(kernel, smem, args, schedule, sync, partial, stream); });
  });
}

cudaError_t se_forward_blocks_per_sm(const ForwardArgs& args, int* blocks) {
  return dispatch_types(args, [&](auto t, auto pt) {
    return with_forward_kernel<decltype(t), decltype(pt)>(
        args, [&](auto kernel, size_t smem) { return resident_blocks(kernel, smem, blocks); });
  });
}

cudaError_t se_backward_blocks_per_sm(const BackwardArgs& args, int* blocks) {
  return dispatch_types(args, [&](auto t, auto pt) {
    return with_backward_kernel<decltype(t), decltype(pt)>(
        args, [&](auto kernel, size_t smem) { return resident_blocks(kernel, smem, blocks); });
  });
}

}  // namespace se_fused
