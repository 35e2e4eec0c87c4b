// The CPU kernel proper (docs/DESIGN.md §10), compiled once per instruction set by
// se_cpu_isa_*.cpp with CPU_CAPABILITY set (DEFAULT, AVX2, AVX512), so ATen's at::vec::Vectorized
// gives each its own SIMD width from this one source. Include it only after the ATen headers (see
// se_cpu_isa_avx2.cpp). Everything here lives in se_fused::cpu::CPU_CAPABILITY.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../se_math.h"
#include "se_cpu.h"

namespace se_fused::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Measured on a 2-core EPYC with 32 MB of L3 (docs/DESIGN.md §10): inputs up to kStreamBytes are
// processed in one group and written with normal stores (everything stays in cache); larger ones
// in groups of kGroupBytes, re-read from cache, and written with streaming stores.
constexpr int64_t kStreamBytes = 8 << 20;
constexpr int64_t kGroupBytes = 4 << 20;
constexpr int64_t kGrain = 16384;         // elements a parallel task covers at least
constexpr int64_t kTasks = 16;            // tasks a pass should offer, at least, to keep the threads busy

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ----------------------------------------------------------------------------- vector steps
// A step moves kStep<A> = 2 * Vectorized<A>::size() elements of T as two Vectorized<A> (a
// Vectorized<T> of a half type converts to exactly two). A partial step (`count` < kStep) reads
// zeros past `count` and writes only `count` elements, so rows of any length stay vectorised.

template <typename A>
constexpr int64_t kStep = 2 * Vectorized<A>::size();

// Forced inline: a step left as a call would make the compiler spill every vector accumulator of
// the loop around it.
#if defined(__GNUC__)
#define SE_ALWAYS_INLINE inline __attribute__((always_inline))
#define SE_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define SE_ALWAYS_INLINE inline
#define SE_ALWAYS_INLINE_LAMBDA
#endif
// Unrolls a loop over the vectors of a register tile (a compile-time trip count, at most 8) before
// anything else sees it: left rolled, GCC 12 turned the zeroing of the accumulator arrays into
// `rep stos` on the stack and stored and reloaded every accumulator at every step of the loop around it.
#if defined(__GNUC__) && !defined(__clang__)
#define SE_UNROLL _Pragma("GCC unroll 8")
#elif defined(__clang__)
#define SE_UNROLL _Pragma("unroll")
#else
#define SE_UNROLL
#endif

// The first 0 <= count <= size() elements at p (the rest zero), or stored to p, with masked
// instructions: ATen's loadu(p, count) / store(p, count) go through a stack buffer and memcpy, and a
// partial step ends every row of a 7x7 or 14x14 map and every position of 72 channels_last channels.
// E: float, double, or a 16-bit type (one Vectorized<E> then holds a whole step). AVX2 masks 32-bit
// lanes, so an odd count of 16-bit elements takes its last one apart.
template <typename E>
SE_ALWAYS_INLINE Vectorized<E> load_partial(const E* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<E, float>) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((uint64_t{1} << count) - 1), p);
  } else if constexpr (std::is_same_v<E, double>) {
    return _mm512_maskz_loadu_pd(static_cast<__mmask8>((uint64_t{1} << count) - 1), p);
  } else if constexpr (sizeof(E) == 2) {
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << count) - 1), p);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i lanes32 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  if constexpr (std::is_same_v<E, float>) {
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes32));
  } else if constexpr (std::is_same_v<E, double>) {
    return _mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), _mm256_setr_epi64x(0, 1, 2, 3)));
  } else if constexpr (sizeof(E) == 2) {
    const __m256i pairs = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count / 2)), lanes32);
    __m256i v = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), pairs);
    if (count % 2) {
      int16_t last;
      std::memcpy(&last, p + count - 1, sizeof(last));
      const __m256i at_last = _mm256_cmpeq_epi16(_mm256_set1_epi16(static_cast<int16_t>(count - 1)),
                                                 _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      v = _mm256_blendv_epi8(v, _mm256_set1_epi16(last), at_last);
    }
    return v;
  }
#endif
  return Vectorized<E>::loadu(p, count);
}

template <typename E>
SE_ALWAYS_INLINE void store_partial(E* p, const Vectorized<E>& v, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<E, float>) {
    return _mm512_mask_storeu_ps(p, static_cast<__mmask16>((uint64_t{1} << count) - 1), v);
  } else if constexpr (std::is_same_v<E, double>) {
    return _mm512_mask_storeu_pd(p, static_cast<__mmask8>((uint64_t{1} << count) - 1), v);
  } else if constexpr (sizeof(E) == 2) {
    return _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint64_t{1} << count) - 1), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i lanes32 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  if constexpr (std::is_same_v<E, float>) {
    return _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes32), v);
  } else if constexpr (std::is_same_v<E, double>) {
    return _mm256_maskstore_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), _mm256_setr_epi64x(0, 1, 2, 3)),
                               v);
  } else if constexpr (sizeof(E) == 2) {
    const __m256i pairs = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count / 2)), lanes32);
    _mm256_maskstore_epi32(reinterpret_cast<int*>(p), pairs, v);
    if (count % 2) {
      alignas(32) int16_t all[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(all), v);
      std::memcpy(p + count - 1, all + count - 1, sizeof(int16_t));
    }
    return;
  }
#endif
  v.store(p, count);
}

template <typename T, typename A>
SE_ALWAYS_INLINE void load(const T* p, Vectorized<A>& v0, Vectorized<A>& v1, int64_t count = kStep<A>) {
  constexpr int64_t V = Vectorized<A>::size();
  if constexpr (std::is_same_v<T, A>) {
    if (count >= 2 * V) {
      v0 = Vectorized<A>::loadu(p), v1 = Vectorized<A>::loadu(p + V);
    } else if (count > V) {
      v0 = Vectorized<A>::loadu(p), v1 = load_partial(p + V, count - V);
    } else {
      v0 = load_partial(p, count), v1 = Vectorized<A>(A(0));
    }
  } else {
    std::tie(v0, v1) = at::vec::convert_to_float<T>(count >= 2 * V ? Vectorized<T>::loadu(p) : load_partial(p, count));
  }
}

template <typename T, typename A>
SE_ALWAYS_INLINE void store(T* p, const Vectorized<A>& v0, const Vectorized<A>& v1, int64_t count = kStep<A>) {
  constexpr int64_t V = Vectorized<A>::size();
  if constexpr (std::is_same_v<T, A>) {
    if (count >= 2 * V) {
      v0.store(p), v1.store(p + V);
    } else if (count > V) {
      v0.store(p), store_partial(p + V, v1, count - V);
    } else {
      store_partial(p, v0, count);
    }
  } else if (count >= 2 * V) {
    at::vec::convert_from_float<T>(v0, v1).store(p);
  } else {
    store_partial(p, at::vec::convert_from_float<T>(v0, v1), count);
  }
}

// Streaming stores bypass the caches and skip the read-for-ownership a normal store makes of each
// line: for outputs far larger than the cache. They need the vector width's alignment (rows start
// with a partial step up to it: stream_head) and an sfence before other threads read the data.
constexpr int64_t kStreamAlign = sizeof(Vectorized<float>);

template <typename T, typename A>
inline void store_streaming(T* p, const Vectorized<A>& v0, const Vectorized<A>& v1) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v0), _mm512_stream_ps(p + Vectorized<A>::size(), v1);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v0), _mm512_stream_pd(p + Vectorized<A>::size(), v1);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<T>(v0, v1));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v0), _mm256_stream_ps(p + Vectorized<A>::size(), v1);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v0), _mm256_stream_pd(p + Vectorized<A>::size(), v1);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<T>(v0, v1));
  }
#else
  store(p, v0, v1);
#endif
}

inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Elements of a row starting at dst before the streaming alignment (0 when not streaming).
template <bool STREAM, typename T>
inline int64_t stream_head(const T* dst, int64_t n) {
  if constexpr (!STREAM) {
    return 0;
  } else {
    const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % kStreamAlign);
    return std::min(n, ((kStreamAlign - misaligned) % kStreamAlign) / static_cast<int64_t>(sizeof(T)));
  }
}

// True when dst + n·sn + k·sk starts on the streaming alignment for every n and k.
template <typename T>
bool aligned_rows(const T* dst, int64_t sn, int64_t sk) {
  const auto whole = [](int64_t stride) { return stride * static_cast<int64_t>(sizeof(T)) % kStreamAlign == 0; };
  return reinterpret_cast<uintptr_t>(dst) % kStreamAlign == 0 && whole(sn) && whole(sk);
}

template <bool STREAM, typename T, typename A>
inline void store_step(T* p, const Vectorized<A>& v0, const Vectorized<A>& v1) {
  if constexpr (STREAM) {
    store_streaming(p, v0, v1);
  } else {
    store(p, v0, v1);
  }
}

// Σ_i a[i] (· b[i] when PRODUCT) over a contiguous row, in a fixed order: 4 vector accumulators.
template <bool PRODUCT, typename T, typename A>
A row_sum(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = kStep<A>;
  Vectorized<A> acc0(A(0)), acc1(A(0)), acc2(A(0)), acc3(A(0));
  const auto step = [&](int64_t i, int64_t count, Vectorized<A>& s0, Vectorized<A>& s1) {
    Vectorized<A> a0, a1;
    load(a + i, a0, a1, count);
    if constexpr (PRODUCT) {
      Vectorized<A> b0, b1;
      load(b + i, b0, b1, count);
      a0 = a0 * b0, a1 = a1 * b1;
    }
    s0 = s0 + a0, s1 = s1 + a1;
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) step(i, W, acc0, acc1), step(i + W, W, acc2, acc3);
  for (; i < n; i += W) step(i, std::min(W, n - i), acc0, acc1);
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& x, Vectorized<A>& y) { return x + y; },
                                    (acc0 + acc1) + (acc2 + acc3));
}

// acc[j] += a[j] (· b[j]) for j < n: one channels_last position.
template <bool PRODUCT, typename T, typename A>
inline void add_columns(const T* a, const T* b, A* acc, int64_t n) {
  constexpr int64_t W = kStep<A>;
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min(W, n - j);
    Vectorized<A> a0, a1, s0, s1;
    load(a + j, a0, a1, count);
    if constexpr (PRODUCT) {
      Vectorized<A> b0, b1;
      load(b + j, b0, b1, count);
      a0 = a0 * b0, a1 = a1 * b1;
    }
    load(acc + j, s0, s1, count);
    store(acc + j, s0 + a0, s1 + a1, count);
  }
}

// Loads a step at a + i (· b + i) into v0, v1.
template <bool PRODUCT, typename T, typename A>
SE_ALWAYS_INLINE void load_product(const T* a, const T* b, int64_t i, int64_t count, Vectorized<A>& v0,
                                   Vectorized<A>& v1) {
  load(a + i, v0, v1, count);
  if constexpr (PRODUCT) {
    Vectorized<A> b0, b1;
    load(b + i, b0, b1, count);
    v0 = v0 * b0, v1 = v1 * b1;
  }
}

// acc[c] = Σ_{p < np} a[p · C + c] (· b[p · C + c]) for C <= kStep / 2 channels of densely packed
// positions: each step reads kStep contiguous elements and counts its first k·C (k whole positions),
// lane j holding channel j mod C; the lanes past k·C are the next step's and are never folded.
template <bool PRODUCT, typename T, typename A>
void packed_column_sums(const T* a, const T* b, int64_t np, int64_t C, A* acc) {
  constexpr int64_t W = kStep<A>, V = Vectorized<A>::size();
  const int64_t L = (W / C) * C, n = np * C;
  Vectorized<A> s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t i = 0;
  for (; i + L + W <= n; i += 2 * L) {  // two independent accumulator pairs
    Vectorized<A> v0, v1, u0, u1;
    load_product<PRODUCT>(a, b, i, W, v0, v1);
    load_product<PRODUCT>(a, b, i + L, W, u0, u1);
    s0 = s0 + v0, s1 = s1 + v1, s2 = s2 + u0, s3 = s3 + u1;
  }
  for (; i < n; i += L) {
    Vectorized<A> v0, v1;
    load_product<PRODUCT>(a, b, i, std::min(W, n - i), v0, v1);
    s0 = s0 + v0, s1 = s1 + v1;
  }
  A lanes[W];
  (s0 + s2).store(lanes), (s1 + s3).store(lanes + V);
  for (int64_t c = 0; c < C; ++c) {
    A sum = 0;
    for (int64_t j = c; j < L; j += C) sum += lanes[j];
    acc[c] = sum;
  }
}

// Accumulators of a register tile: ROWS x 2 vectors, zeroed (the column sums below, the MLP's tiles).
template <int64_t ROWS, typename A>
struct TileAcc {
  Vectorized<A> v0[ROWS], v1[ROWS];
  SE_ALWAYS_INLINE TileAcc() {
    SE_UNROLL
    for (int64_t t = 0; t < ROWS; ++t) v0[t] = v1[t] = Vectorized<A>(A(0));
  }
};

// acc[c] = Σ_{p < np} a[p · pa + c] (· b[p · pb + c]) for c < cols <= NS · kStep, NS vector steps of
// accumulators kept in registers across positions (through memory, each position would wait on the
// previous one's store).
template <int NS, bool PRODUCT, typename T, typename A>
void register_column_sums(const T* a, int64_t pa, const T* b, int64_t pb, int64_t np, int64_t cols, A* acc) {
  constexpr int64_t W = kStep<A>;
  TileAcc<NS, A> sums;
  for (int64_t p = 0; p < np; ++p) {
    SE_UNROLL
    for (int k = 0; k < NS; ++k) {
      Vectorized<A> v0, v1;
      load_product<PRODUCT>(a + p * pa, b + p * pb, k * W, std::min(W, cols - k * W), v0, v1);
      sums.v0[k] = sums.v0[k] + v0, sums.v1[k] = sums.v1[k] + v1;
    }
  }
  SE_UNROLL
  for (int k = 0; k < NS; ++k) store(acc + k * W, sums.v0[k], sums.v1[k], std::min(W, cols - k * W));
}

// acc[c] = Σ_{p < np} a[p · pa + c] (· b[p · pb + c]) for c < C: a chunk of positions of one channels_last
// sample, each sum in an order fixed by C and np alone.
template <bool PRODUCT, typename T, typename A>
void column_sums(const T* a, int64_t pa, const T* b, int64_t pb, int64_t np, int64_t C, A* acc) {
  constexpr int64_t W = kStep<A>;
  if (C <= W / 2 && pa == C && (!PRODUCT || pb == C)) return packed_column_sums<PRODUCT>(a, b, np, C, acc);
  if (C > 4 * W) {
    std::fill(acc, acc + C, A(0));
    for (int64_t p = 0; p < np; ++p) add_columns<PRODUCT>(a + p * pa, b + p * pb, acc, C);
    return;
  }
  switch ((C + W - 1) / W) {
    case 1: return register_column_sums<1, PRODUCT>(a, pa, b, pb, np, C, acc);
    case 2: return register_column_sums<2, PRODUCT>(a, pa, b, pb, np, C, acc);
    case 3: return register_column_sums<3, PRODUCT>(a, pa, b, pb, np, C, acc);
    default: return register_column_sums<4, PRODUCT>(a, pa, b, pb, np, C, acc);
  }
}

// ----------------------------------------------------------------------------- the residual tail
// out_act of y = out_act(x * s + residual) (OUT: 0 none, 1 ReLU, 2 SiLU) and the gradient at its input,
// computed as eager's CPU kernels compute them (NaN and Inf included): ReLU as clamp_min, its
// gradient from y's sign (threshold_backward), SiLU as t / (1 + exp(-t)). The scalar forms, which
// the CUDA kernels share, are se_math.h's out_activation and out_activation_backward.

template <int OUT, typename A>
SE_ALWAYS_INLINE Vectorized<A> out_activation(const Vectorized<A>& v) {
  if constexpr (OUT == 1) {
    return at::vec::clamp_min(v, Vectorized<A>(A(0)));
  } else if constexpr (OUT == 2) {
    return v / (Vectorized<A>(A(1)) + v.neg().exp());
  } else {
    return v;
  }
}

// g · out_act'(·) from `u`: y for ReLU, the activation's input t for SiLU.
template <int OUT, typename A>
SE_ALWAYS_INLINE Vectorized<A> out_activation_grad(const Vectorized<A>& g, const Vectorized<A>& u) {
  const Vectorized<A> zero(A(0)), one(A(1));
  if constexpr (OUT == 1) {
    return Vectorized<A>::blendv(g, zero, u <= zero);  // threshold_backward: a NaN y passes g on
  } else {
    const Vectorized<A> sig = one / (one + u.neg().exp());
    return g * (sig * (one + u * (one - sig)));
  }
}

// The end of a rescale step: v (+ res) through out_act, stored (streaming when STREAM and whole).
template <bool STREAM, int OUT, bool RES, typename T, typename A>
SE_ALWAYS_INLINE void finish_step(const T* res, T* dst, Vectorized<A> v0, Vectorized<A> v1, int64_t count) {
  if constexpr (RES) {
    Vectorized<A> r0, r1;
    load(res, r0, r1, count);
    v0 = v0 + r0, v1 = v1 + r1;
  }
  v0 = out_activation<OUT>(v0), v1 = out_activation<OUT>(v1);
  if (count == kStep<A>) {
    store_step<STREAM>(dst, v0, v1);
  } else {
    store(dst, v0, v1, count);
  }
}

// Calls step(i, count) over [0, n) in vector steps, the first one up to the streaming alignment of dst.
template <bool STREAM, typename A, typename T, typename Step>
SE_ALWAYS_INLINE void for_steps(const T* dst, int64_t n, const Step& step) {
  constexpr int64_t W = kStep<A>;
  const int64_t head = stream_head<STREAM>(dst, n);
  if (head) step(0, head);
  for (int64_t i = head; i < n; i += W) step(i, std::min(W, n - i));
}

// dst[i] = out_act(src[i] * s (+ t) (+ res[i])) over a contiguous row.
template <bool SHIFT, bool STREAM, int OUT, bool RES, typename T, typename A>
void scale_row(const T* src, const T* res, T* dst, int64_t n, A s, A t) {
  const Vectorized<A> vs(s), vt(t);
  for_steps<STREAM, A>(dst, n, [&](int64_t i, int64_t count) {
    Vectorized<A> v0, v1;
    load(src + i, v0, v1, count);
    v0 = v0 * vs, v1 = v1 * vs;
    if constexpr (SHIFT) v0 = v0 + vt, v1 = v1 + vt;
    finish_step<STREAM, OUT, RES>(RES ? res + i : res, dst + i, v0, v1, count);
  });
}

// dst[i] = out_act(src[i] * s[i mod C] (+ t[i mod C]) (+ res[i])) over n contiguous elements of whole
// channels_last positions of C channels: one position (n = C), or a run of back-to-back positions
// walked in whole steps instead of a partial step at the end of each (72 channels: 4.5 steps a position,
// not 4 and a masked one). For a run, s and t hold the sample's scales twice over (C + kStep entries),
// so a step that starts at channel j reads its lanes' scales at s + j, across the wrap.
template <bool SHIFT, bool STREAM, int OUT, bool RES, typename T, typename A>
void scale_columns(const T* src, const T* res, T* dst, const A* s, const A* t, int64_t C, int64_t n) {
  int64_t j = 0;  // the channel of the step's first element
  for_steps<STREAM, A>(dst, n, [&](int64_t i, int64_t count) {
    Vectorized<A> v0, v1, s0, s1;
    load(src + i, v0, v1, count);
    load(s + j, s0, s1, count);
    v0 = v0 * s0, v1 = v1 * s1;
    if constexpr (SHIFT) {
      Vectorized<A> t0, t1;
      load(t + j, t0, t1, count);
      v0 = v0 + t0, v1 = v1 + t1;
    }
    finish_step<STREAM, OUT, RES>(RES ? res + i : res, dst + i, v0, v1, count);
    for (j += count; j >= C;) j -= C;
  });
}

// dst[k] = out_act(src[k] * s[k / P] (+ t[k / P]) (+ res[k])) for k in [k0, k1) of back-to-back rows of
// P >= kStep elements: one walk over the rows, so only the walk's first and last steps can be partial (7x7
// and 14x14 rows walked one by one end in a partial step each, and a streamed one mixes normal and
// streaming stores in a shared line). A step crosses at most one row boundary and blends the two scales.
template <bool SHIFT, bool STREAM, int OUT, bool RES, typename T, typename A>
void scale_flat(const T* src, const T* res, T* dst, int64_t k0, int64_t k1, int64_t P, const A* s, const A* t) {
  constexpr int64_t V = Vectorized<A>::size();
  const Vectorized<A> lanes0 = Vectorized<A>::arange(A(0), A(1)), lanes1 = Vectorized<A>::arange(A(V), A(1));
  int64_t row = k0 / P, next = (row + 1) * P;  // the row of the step's first element; where the next one starts
  for_steps<STREAM, A>(dst + k0, k1 - k0, [&](int64_t i, int64_t count) {
    const int64_t k = k0 + i;
    if (k >= next) row += 1, next += P;
    Vectorized<A> s0(s[row]), s1(s[row]), t0, t1;
    if constexpr (SHIFT) t0 = t1 = Vectorized<A>(t[row]);
    if (k + count > next) {  // lanes from next - k on belong to the next row
      const Vectorized<A> from(static_cast<A>(next - k));
      const Vectorized<A> m0 = lanes0 >= from, m1 = lanes1 >= from;
      s0 = Vectorized<A>::blendv(s0, Vectorized<A>(s[row + 1]), m0);
      s1 = Vectorized<A>::blendv(s1, Vectorized<A>(s[row + 1]), m1);
      if constexpr (SHIFT) {
        t0 = Vectorized<A>::blendv(t0, Vectorized<A>(t[row + 1]), m0);
        t1 = Vectorized<A>::blendv(t1, Vectorized<A>(t[row + 1]), m1);
      }
    }
    Vectorized<A> v0, v1;
    load(src + k, v0, v1, count);
    v0 = v0 * s0, v1 = v1 * s1;
    if constexpr (SHIFT) v0 = v0 + t0, v1 = v1 + t1;
    finish_step<STREAM, OUT, RES>(RES ? res + k : res, dst + k, v0, v1, count);
  });
}

// dst[i] = out_act(src[i] * s[i mod C] (+ t[i mod C]) (+ res[i])) over n contiguous elements of whole
// channels_last positions, C <= kStep / 2: lane j of a step holds channel j mod C, so one pattern of s
// serves every step. A step advances by the k·C elements of its whole positions; where C does not divide
// the step width, steps overlap by part of a position and store the same values twice (normal stores; a
// step re-reads src where the previous one stored, so dst must not alias src or res). Streaming stores only
// where C divides the step width and the run starts aligned.
template <bool SHIFT, bool STREAM, int OUT, bool RES, typename T, typename A>
void scale_packed(const T* src, const T* res, T* dst, const A* s, const A* t, int64_t C, int64_t n) {
  constexpr int64_t W = kStep<A>, V = Vectorized<A>::size();
  A sp[W], tp[W];
  for (int64_t j = 0; j < W; ++j) sp[j] = s[j % C], tp[j] = SHIFT ? t[j % C] : A(0);
  const Vectorized<A> s0 = Vectorized<A>::loadu(sp), s1 = Vectorized<A>::loadu(sp + V);
  const Vectorized<A> t0 = Vectorized<A>::loadu(tp), t1 = Vectorized<A>::loadu(tp + V);
  const auto step = [&](auto stream, int64_t i, int64_t count) SE_ALWAYS_INLINE_LAMBDA {
    Vectorized<A> v0, v1;
    load(src + i, v0, v1, count);
    v0 = v0 * s0, v1 = v1 * s1;
    if constexpr (SHIFT) v0 = v0 + t0, v1 = v1 + t1;
    finish_step<decltype(stream)::value, OUT, RES>(RES ? res + i : res, dst + i, v0, v1, count);
  };
  if (W % C == 0) {
    const bool aligned = stream_head<STREAM>(dst, n) == 0;  // then every whole step is aligned
    for (int64_t i = 0; i < n; i += W) {
      if (aligned) {
        step(std::bool_constant<STREAM>{}, i, std::min(W, n - i));
      } else {
        step(std::false_type{}, i, std::min(W, n - i));
      }
    }
    return;
  }
  const int64_t L = (W / C) * C;
  for (int64_t i = 0;; i += L) {
    step(std::false_type{}, i, std::min(W, n - i));
    if (i + W >= n) break;
  }
}

// ----------------------------------------------------------------------------- memory passes

// How a pass over two (N, C, P) views walks them: rows of P contiguous positions (NCHW), rows of C
// contiguous channels (channels_last), or element by element (any other strides, or two layouts).
enum class Layout { kRows, kColumns, kStrided };

Layout layout_of(std::initializer_list<Strides3> views, int64_t C, int64_t P) {
  const auto columns = [&](const Strides3& s) { return s.c == 1 && C > 1 && (s.p != 1 || P == 1); };
  const auto rows = [&](const Strides3& s) { return !columns(s) && s.p == 1; };
  if (std::all_of(views.begin(), views.end(), columns)) return Layout::kColumns;
  if (std::all_of(views.begin(), views.end(), rows)) return Layout::kRows;
  return Layout::kStrided;
}

// Calls body(n, c) for the flat (sample, channel) indices [i0, i1) counted from sample n0, in order,
// without a division per index (rows can be as short as 49 elements).
template <typename Body>
inline void for_rows(int64_t n0, int64_t C, int64_t i0, int64_t i1, const Body& body) {
  int64_t n = n0 + i0 / C, c = i0 % C;
  for (int64_t i = i0; i < i1; ++i) {
    body(n, c);
    if (++c == C) c = 0, ++n;
  }
}

// out[n * C + c] = Σ_p a[n, c, p] (· b[n, c, p]) for samples [n0, n1); each sum by one task, in order.
template <bool PRODUCT, typename T, typename A>
void channel_sums(int64_t n0, int64_t n1, int64_t C, int64_t P, const T* a, Strides3 sa, const T* b, Strides3 sb,
                  A* out) {
  const int64_t G = n1 - n0;
  const Layout layout = layout_of({sa, sb}, C, P);
  if (layout == Layout::kColumns) {
    // Each task sums a chunk of positions, reading whole contiguous position rows; the chunks'
    // partial sums are then added in chunk order. Samples are cut into chunks only as far as it
    // takes to give every thread work, and the cut does not depend on the thread count.
    const int64_t per_sample = std::clamp<int64_t>((kTasks + G - 1) / G, 1, (P * C + kGrain - 1) / kGrain);
    const int64_t chunk = (P + per_sample - 1) / per_sample, chunks = (P + chunk - 1) / chunk;
    std::vector<A> partial(G * chunks * C);
    at::parallel_for(0, G * chunks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = n0 + i / chunks, p0 = (i % chunks) * chunk, p1 = std::min(P, p0 + chunk);
        column_sums<PRODUCT>(a + n * sa.n + p0 * sa.p, sa.p, b + n * sb.n + p0 * sb.p, sb.p, p1 - p0, C,
                             partial.data() + i * C);
      }
    });
    at::parallel_for(0, G * C, kGrain, [&](int64_t i0, int64_t i1) {
      for_rows(0, C, i0, i1, [&](int64_t g, int64_t c) {
        A sum = 0;
        for (int64_t k = 0; k < chunks; ++k) sum += partial[(g * chunks + k) * C + c];
        out[(n0 + g) * C + c] = sum;
      });
    });
    return;
  }
  at::parallel_for(0, G * C, std::max<int64_t>(1, kGrain / P), [&](int64_t i0, int64_t i1) {
    for_rows(n0, C, i0, i1, [&](int64_t n, int64_t c) {
      const T* pa = a + n * sa.n + c * sa.c;
      const T* pb = b + n * sb.n + c * sb.c;
      if (layout == Layout::kRows) {
        out[n * C + c] = row_sum<PRODUCT, T, A>(pa, pb, P);
        return;
      }
      A sum = 0;
      for (int64_t p = 0; p < P; ++p) {
        sum += PRODUCT ? static_cast<A>(pa[p * sa.p]) * static_cast<A>(pb[p * sb.p]) : static_cast<A>(pa[p * sa.p]);
      }
      out[n * C + c] = sum;
    });
  });
}

// dst[n, c, p] = out_act(src[n, c, p] * s[n * C + c] (+ t[n * C + c]) (+ res[n, c, p])) for samples
// [n0, n1); streaming stores when STREAM.
template <bool SHIFT, bool STREAM, int OUT = 0, bool RES = false, typename T, typename A>
void scale_channels(int64_t n0, int64_t n1, int64_t C, int64_t P, const T* src, Strides3 ss, T* dst, Strides3 sd,
                    const A* s, const A* t, const T* res = nullptr, Strides3 sr = {}) {
  const int64_t G = n1 - n0;
  const Layout layout = RES ? layout_of({ss, sd, sr}, C, P) : layout_of({ss, sd}, C, P);
  const bool packed_positions = layout == Layout::kColumns && ss.p == C && sd.p == C && (!RES || sr.p == C);
  const bool packed = packed_positions && C <= kStep<A> / 2;
  const bool wrapped = packed_positions && !packed && C % kStep<A> != 0;
  const auto back_to_back = [&](const Strides3& v) { return v.c == P && v.n == C * P; };
  const bool flat = layout == Layout::kRows && P >= kStep<A> && back_to_back(ss) && back_to_back(sd) &&
                    (!RES || back_to_back(sr));
  if constexpr (STREAM) {
    // A row of dst that does not start on the streaming alignment begins and ends with normal stores
    // into cache lines its neighbours stream to, which costs more than streaming saves (8 x 2048 x 196
    // float32 forward: 1.7x the time of 8 x 2048 x 208). Packed runs and flat walks have their own rule.
    if (!packed && !wrapped && !flat && !aligned_rows(dst, sd.n, layout == Layout::kColumns ? sd.p : sd.c)) {
      return scale_channels<SHIFT, false, OUT, RES>(n0, n1, C, P, src, ss, dst, sd, s, t, res, sr);
    }
  }
  if (flat) {  // tasks of whole steps: each but the last starts where the previous one ended, aligned alike
    constexpr int64_t W = kStep<A>;
    const int64_t total = G * C * P;
    const T* src0 = src + n0 * ss.n;
    const T* res0 = RES ? res + n0 * sr.n : res;
    T* dst0 = dst + n0 * sd.n;
    at::parallel_for(0, (total + W - 1) / W, std::max<int64_t>(1, kGrain / W), [&](int64_t b0, int64_t b1) {
      scale_flat<SHIFT, STREAM, OUT, RES>(src0, res0, dst0, b0 * W, std::min(total, b1 * W), P, s + n0 * C,
                                          SHIFT ? t + n0 * C : s);
      if constexpr (STREAM) fence_streaming_stores();
    });
    return;
  }
  if (layout == Layout::kColumns) {
    at::parallel_for(0, G * P, std::max<int64_t>(1, kGrain / C), [&](int64_t i0, int64_t i1) {
      if (packed) {  // a sample's positions in this task as one run
        for (int64_t i = i0; i < i1;) {
          const int64_t n = n0 + i / P, p = i % P, end = std::min(i1, (i / P + 1) * P);
          scale_packed<SHIFT, STREAM, OUT, RES>(src + n * ss.n + p * C, RES ? res + n * sr.n + p * C : nullptr,
                                                dst + n * sd.n + p * C, s + n * C, SHIFT ? t + n * C : s, C,
                                                (end - i) * C);
          i = end;
        }
        if constexpr (STREAM) fence_streaming_stores();
        return;
      }
      if (wrapped) {  // a sample's positions in this task as one run
        std::vector<A> s2(C + kStep<A>), t2(SHIFT ? C + kStep<A> : 0);
        for (int64_t i = i0; i < i1;) {
          const int64_t n = n0 + i / P, p = i % P, end = std::min(i1, (i / P + 1) * P);
          for (int64_t j = 0; j < C + kStep<A>; ++j) {
            s2[j] = s[n * C + j % C];
            if constexpr (SHIFT) t2[j] = t[n * C + j % C];
          }
          scale_columns<SHIFT, STREAM, OUT, RES>(src + n * ss.n + p * C, RES ? res + n * sr.n + p * C : nullptr,
                                                 dst + n * sd.n + p * C, s2.data(), SHIFT ? t2.data() : s2.data(),
                                                 C, (end - i) * C);
          i = end;
        }
        if constexpr (STREAM) fence_streaming_stores();
        return;
      }
      for_rows(n0, P, i0, i1, [&](int64_t n, int64_t p) {
        scale_columns<SHIFT, STREAM, OUT, RES>(src + n * ss.n + p * ss.p, RES ? res + n * sr.n + p * sr.p : nullptr,
                                               dst + n * sd.n + p * sd.p, s + n * C, SHIFT ? t + n * C : s, C, C);
      });
      if constexpr (STREAM) fence_streaming_stores();
    });
    return;
  }
  at::parallel_for(0, G * C, std::max<int64_t>(1, kGrain / P), [&](int64_t i0, int64_t i1) {
    for_rows(n0, C, i0, i1, [&](int64_t n, int64_t c) {
      const A scale = s[n * C + c], shift = SHIFT ? t[n * C + c] : A(0);
      const T* ps = src + n * ss.n + c * ss.c;
      const T* pr = RES ? res + n * sr.n + c * sr.c : nullptr;
      T* pd = dst + n * sd.n + c * sd.c;
      if (layout == Layout::kRows) {
        scale_row<SHIFT, STREAM, OUT, RES>(ps, pr, pd, P, scale, shift);
        return;
      }
      for (int64_t p = 0; p < P; ++p) {
        A v = static_cast<A>(ps[p * ss.p]) * scale + shift;
        if constexpr (RES) v += static_cast<A>(pr[p * sr.p]);
        pd[p * sd.p] = static_cast<T>(se_fused::out_activation(v, OutAct(OUT)));
      }
    });
    if constexpr (STREAM) fence_streaming_stores();
  });
}

// dt[n, c, p] = g · out_act'(u) for samples [n0, n1), the gradient at the tail's input, with u = y
// (ReLU: `y` points at y) or u = x * s + residual (SiLU: `y` points at x; `res` null without residual).
template <int OUT, bool RES, typename T, typename A>
void tail_gradient(int64_t n0, int64_t n1, int64_t C, int64_t P, const T* g, Strides3 sg, const T* y, Strides3 sy,
                   const T* res, Strides3 sr, const A* s, T* dt, Strides3 sd) {
  constexpr int64_t W = kStep<A>;
  constexpr bool kFromX = OUT == 2;  // SiLU recomputes its input from x
  const int64_t G = n1 - n0;
  const Layout layout = RES ? layout_of({sg, sy, sr, sd}, C, P) : layout_of({sg, sy, sd}, C, P);
  // one step of `count` elements; `scale` gives the two vectors of s at that step
  const auto step = [&](const T* pg, const T* py, const T* pr, T* pd, int64_t count, Vectorized<A> s0,
                        Vectorized<A> s1) SE_ALWAYS_INLINE_LAMBDA {
    Vectorized<A> g0, g1, u0, u1;
    load(pg, g0, g1, count);
    load(py, u0, u1, count);
    if constexpr (kFromX) {
      u0 = u0 * s0, u1 = u1 * s1;
      if constexpr (RES) {
        Vectorized<A> r0, r1;
        load(pr, r0, r1, count);
        u0 = u0 + r0, u1 = u1 + r1;
      }
    }
    store(pd, out_activation_grad<OUT>(g0, u0), out_activation_grad<OUT>(g1, u1), count);
  };
  if (layout == Layout::kColumns) {
    at::parallel_for(0, G * P, std::max<int64_t>(1, kGrain / C), [&](int64_t i0, int64_t i1) {
      for_rows(n0, P, i0, i1, [&](int64_t n, int64_t p) {
        const T *pg = g + n * sg.n + p * sg.p, *py = y + n * sy.n + p * sy.p;
        const T* pr = RES ? res + n * sr.n + p * sr.p : nullptr;
        T* pd = dt + n * sd.n + p * sd.p;
        for (int64_t j = 0; j < C; j += W) {
          Vectorized<A> s0, s1;
          const int64_t count = std::min(W, C - j);
          if constexpr (kFromX) load(s + n * C + j, s0, s1, count);
          step(pg + j, py + j, RES ? pr + j : nullptr, pd + j, count, s0, s1);
        }
      });
    });
    return;
  }
  at::parallel_for(0, G * C, std::max<int64_t>(1, kGrain / P), [&](int64_t i0, int64_t i1) {
    for_rows(n0, C, i0, i1, [&](int64_t n, int64_t c) {
      const A scale = s[n * C + c];
      const T *pg = g + n * sg.n + c * sg.c, *py = y + n * sy.n + c * sy.c;
      const T* pr = RES ? res + n * sr.n + c * sr.c : nullptr;
      T* pd = dt + n * sd.n + c * sd.c;
      if (layout == Layout::kRows) {
        const Vectorized<A> vs(scale);
        for (int64_t i = 0; i < P; i += W) step(pg + i, py + i, RES ? pr + i : nullptr, pd + i, std::min(W, P - i), vs, vs);
        return;
      }
      for (int64_t p = 0; p < P; ++p) {
        A u = static_cast<A>(py[p * sy.p]);
        if constexpr (kFromX) u *= scale;
        if constexpr (RES) u += static_cast<A>(pr[p * sr.p]);
        const A grad = static_cast<A>(pg[p * sg.p]);
        pd[p * sd.p] = static_cast<T>(se_fused::out_activation_backward(grad, u, OutAct(OUT)));
      }
    });
  });
}

// Calls body(std::integral_constant<int, k>{}) for k = out_act's kernel code (0 none, 1 ReLU, 2 SiLU).
template <typename Body>
void with_out_act(OutAct out_act, const Body& body) {
  switch (out_act) {
    case OutAct::kRelu: return body(std::integral_constant<int, 1>{});
    case OutAct::kSilu: return body(std::integral_constant<int, 2>{});
    default: return body(std::integral_constant<int, 0>{});
  }
}

// Calls body(std::bool_constant<b>{}) for a run-time bool b.
template <typename Body>
void with_bool(bool b, const Body& body) {
  if (b) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// Samples per group: all of them when the input (`tensors` of that size per pass) fits kStreamBytes,
// else as many as fit kGroupBytes, with groups as even as that allows.
int64_t group_size(int64_t N, int64_t C, int64_t P, int64_t element_size, int tensors) {
  const int64_t sample = std::max<int64_t>(1, C * P * element_size * tensors);
  if (N * sample <= kStreamBytes) return N;
  const int64_t most = std::clamp<int64_t>(kGroupBytes / sample, 1, N);
  const int64_t groups = (N + most - 1) / most;
  return (N + groups - 1) / groups;
}

// ----------------------------------------------------------------------------- the MLP's matrix products
// A group holds few samples (M) and the weights are C x R: these products read each weight once,
// converting it from the parameters' dtype as it is loaded (no per-call copies), keep a tile of
// partial sums in registers, and sum in an order that does not depend on the thread count. At
// M = 8, C = 2048, R = 128 ATen's GEMM (MKL) took ~120 us a layer, most of it packing.

constexpr int64_t kTileRows = 4;  // rows of a group a task carries through one pass over a weight

template <typename A>
inline A reduce_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& x, Vectorized<A>& y) { return x + y; }, v);
}

// acc[t] += in[t, k..k+count) · wj[k..k+count), elementwise, for t < ROWS (in's rows K apart).
template <int64_t ROWS, typename W, typename A>
SE_ALWAYS_INLINE void dot_step(const A* __restrict in, int64_t K, const W* __restrict wj, int64_t k, int64_t count,
                               TileAcc<ROWS, A>& acc) {
  Vectorized<A> w0, w1;
  load(wj + k, w0, w1, count);
  SE_UNROLL
  for (int64_t t = 0; t < ROWS; ++t) {
    Vectorized<A> x0, x1;
    load(in + t * K + k, x0, x1, count);
    acc.v0[t] = at::vec::fmadd(x0, w0, acc.v0[t]);
    acc.v1[t] = at::vec::fmadd(x1, w1, acc.v1[t]);
  }
}

// out[m0 + t, j] = bias + Σ_k in[m0 + t, k] · w[j, k] for t < ROWS (restrict: the accumulators stay
// in registers).
template <int64_t ROWS, typename W, typename A>
inline void dot_tile(const A* __restrict in, int64_t K, const W* __restrict wj, A bias, A* __restrict out,
                     int64_t out_stride) {
  constexpr int64_t S = kStep<A>;
  TileAcc<ROWS, A> acc;
  int64_t k = 0;
  for (; k + S <= K; k += S) dot_step<ROWS>(in, K, wj, k, S, acc);
  if (k < K) dot_step<ROWS>(in, K, wj, k, K - k, acc);
  SE_UNROLL
  for (int64_t t = 0; t < ROWS; ++t) out[t * out_stride] = bias + reduce_sum(acc.v0[t] + acc.v1[t]);
}

// out[m, j] = bias[j] + Σ_k in[m, k] · w[j, k]: a forward layer. in (M, K), w (J, K), out (M, J).
template <typename W, typename A>
void dot_rows(const A* in, int64_t M, int64_t K, const W* w, const W* bias, int64_t J, A* out) {
  at::parallel_for(0, J, std::max<int64_t>(1, kGrain / (M * K)), [=](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const A b = bias ? static_cast<A>(bias[j]) : A(0);
      int64_t m = 0;
      for (; m + kTileRows <= M; m += kTileRows) dot_tile<kTileRows>(in + m * K, K, w + j * K, b, out + m * J + j, J);
      for (; m < M; ++m) dot_tile<1>(in + m * K, K, w + j * K, b, out + m * J + j, J);
    }
  });
}

// Rows of w one pass of axpy_rows keeps in L1, and the columns (elements) of w a task covers.
constexpr int64_t kAxpyBlockRows = 8;
constexpr int64_t kAxpyBlockCols = 256;

// dst[t, j..j+count) (+)= Σ_{c < rows} in[t, c] · wj[c · J, +count) for t < ROWS (in's rows Cin
// apart, dst's J apart); `first` stores instead of adding.
template <int64_t ROWS, typename W, typename A>
inline void axpy_block(const A* __restrict in, int64_t Cin, const W* __restrict wj, int64_t J, int64_t rows,
                       int64_t count, bool first, A* __restrict dst) {
  TileAcc<ROWS, A> acc;
  for (int64_t c = 0; c < rows; ++c) {
    Vectorized<A> w0, w1;
    load(wj + c * J, w0, w1, count);
    SE_UNROLL
    for (int64_t t = 0; t < ROWS; ++t) {
      const Vectorized<A> x(in[t * Cin + c]);
      acc.v0[t] = at::vec::fmadd(x, w0, acc.v0[t]);
      acc.v1[t] = at::vec::fmadd(x, w1, acc.v1[t]);
    }
  }
  SE_UNROLL
  for (int64_t t = 0; t < ROWS; ++t) {
    if (!first) {
      Vectorized<A> d0, d1;
      load(dst + t * J, d0, d1, count);
      acc.v0[t] = acc.v0[t] + d0, acc.v1[t] = acc.v1[t] + d1;
    }
    store(dst + t * J, acc.v0[t], acc.v1[t], count);
  }
}

// out[m, j] = scale · Σ_c in[m, c] · w[c, j]: a backward layer. in (M, Cin), w (Cin, J), out (M, J).
// A task covers a range of w's rows and a block of its columns and walks them a few whole rows at a
// time, so that every line of w is read once, in order (a task walking one 16-column strip down all
// rows read a new line, often on a new page, at every step: ~0.45 ms of the backward at M = 8,
// C = 2048, R = 128 instead of ~0.05). Row ranges sum into their own partial outputs, added in range
// order; the cut depends on the shape alone, so the result does not depend on the thread count.
template <typename W, typename A>
void axpy_rows(const A* in, int64_t M, int64_t Cin, const W* w, int64_t J, A scale, A* out) {
  constexpr int64_t S = kStep<A>;
  const int64_t width = std::min(J, kAxpyBlockCols), col_blocks = (J + width - 1) / width;
  const int64_t most_ranges = (Cin + kAxpyBlockRows - 1) / kAxpyBlockRows;
  const int64_t wanted = std::clamp<int64_t>((kTasks + col_blocks - 1) / col_blocks, 1, most_ranges);
  const int64_t range_rows = ((Cin + wanted - 1) / wanted + kAxpyBlockRows - 1) / kAxpyBlockRows * kAxpyBlockRows;
  const int64_t ranges = (Cin + range_rows - 1) / range_rows;
  std::vector<A> partial(ranges * M * J);  // (range, m, j)
  at::parallel_for(0, ranges * col_blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c0 = (i / col_blocks) * range_rows, c1 = std::min(Cin, c0 + range_rows);
      const int64_t j0 = (i % col_blocks) * width, j1 = std::min(J, j0 + width);
      A* dst = partial.data() + (i / col_blocks) * M * J;
      for (int64_t cb = c0; cb < c1; cb += kAxpyBlockRows) {
        const int64_t rows = std::min(kAxpyBlockRows, c1 - cb);
        for (int64_t j = j0; j < j1; j += S) {
          const int64_t count = std::min(S, j1 - j);
          const W* wj = w + cb * J + j;
          int64_t m = 0;
          for (; m + kTileRows <= M; m += kTileRows) {
            axpy_block<kTileRows>(in + m * Cin + cb, Cin, wj, J, rows, count, cb == c0, dst + m * J + j);
          }
          for (; m < M; ++m) axpy_block<1>(in + m * Cin + cb, Cin, wj, J, rows, count, cb == c0, dst + m * J + j);
        }
      }
    }
  });
  at::parallel_for(0, M * J, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      A sum = partial[i];
      for (int64_t r = 1; r < ranges; ++r) sum += partial[r * M * J + i];
      out[i] = scale * sum;
    }
  });
}

// out[i + t, j..j+count) = Σ_m u[m, i + t] · v[m, j..j+count), m ascending, for t < ROWS: ROWS rows
// share each load of v and give the FMA units ROWS x 2 independent sums.
template <int64_t ROWS, typename W, typename A>
inline void outer_tile(const A* __restrict u, const A* __restrict v, int64_t M, int64_t I, int64_t J, int64_t j,
                       int64_t count, W* __restrict out) {
  TileAcc<ROWS, A> acc;
  for (int64_t m = 0; m < M; ++m) {
    Vectorized<A> v0, v1;
    load(v + m * J + j, v0, v1, count);
    SE_UNROLL
    for (int64_t t = 0; t < ROWS; ++t) {
      const Vectorized<A> x(u[m * I + t]);
      acc.v0[t] = at::vec::fmadd(x, v0, acc.v0[t]);
      acc.v1[t] = at::vec::fmadd(x, v1, acc.v1[t]);
    }
  }
  SE_UNROLL
  for (int64_t t = 0; t < ROWS; ++t) store(out + t * J + j, acc.v0[t], acc.v1[t], count);
}

// out[i, j] = Σ_m u[m, i] · v[m, j], m ascending: a weight gradient summed over the batch, written
// in the parameters' dtype. u (M, I), v (M, J), out (I, J).
template <typename W, typename A>
void outer_sums(const A* u, const A* v, int64_t M, int64_t I, int64_t J, W* out) {
  constexpr int64_t S = kStep<A>;
  const int64_t tiles = (I + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, std::max<int64_t>(1, kGrain / (M * J * kTileRows)), [=](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t i0 = tile * kTileRows;
      for (int64_t j = 0; j < J; j += S) {
        const int64_t count = std::min(S, J - j);
        if (i0 + kTileRows <= I) {
          outer_tile<kTileRows>(u + i0, v, M, I, J, j, count, out + i0 * J);
        } else {
          for (int64_t i = i0; i < I; ++i) outer_tile<1>(u + i, v, M, I, J, j, count, out + i * J);
        }
      }
    }
  });
}

// ATen's own activation kernels on the small (G, R) tensors: vectorised transcendentals and exactly
// eager's NaN/Inf behaviour, forward and backward.
Tensor activation(const Tensor& a, Act act) { return act == Act::kRelu ? at::relu(a) : at::silu(a); }

// The (G, C) vectors' elementwise steps in the kernel's own loops: called on one thread between
// parallel passes, ATen's sigmoid_out took ~40 us on 8 x 2048 floats here (div_ ~15 us) while the
// other thread waited. The formulas are ATen's vectorised kernels', so NaN and Inf behave as in
// eager: sigmoid 1 / (1 + exp(-e)); hardsigmoid min(max(e + 3, 0), 6) / 6 (NaN-propagating min and
// max); sigmoid's gradient g (1 - s) s; hardsigmoid's a select on -3 < e < 3 (a NaN e gives 0).
template <typename A, typename Step>
SE_ALWAYS_INLINE void for_values(int64_t n, const Step& step) {
  for (int64_t i = 0; i < n; i += kStep<A>) step(i, std::min(kStep<A>, n - i));
}

// s[i] = gate(e[i]) for i < n.
template <typename A>
void gate_values(const A* e, A* s, int64_t n, Gate gate) {
  const Vectorized<A> one(A(1)), zero(A(0)), three(A(3)), six(A(6));
  const auto f = [&](const Vectorized<A>& v) SE_ALWAYS_INLINE_LAMBDA {
    return gate == Gate::kSigmoid ? one / (one + v.neg().exp())
                                  : at::vec::minimum(at::vec::maximum(v + three, zero), six) / six;
  };
  for_values<A>(n, [&](int64_t i, int64_t count) SE_ALWAYS_INLINE_LAMBDA {
    Vectorized<A> v0, v1;
    load(e + i, v0, v1, count);
    store(s + i, f(v0), f(v1), count);
  });
}

// g[i] = g[i] · gate'(e[i]) for i < n, with s = gate(e): the gradient at the gate's input.
template <typename A>
void gate_grad_values(A* g, const A* s, const A* e, int64_t n, Gate gate) {
  const Vectorized<A> one(A(1)), zero(A(0)), three(A(3)), six(A(6));
  const auto f = [&](const Vectorized<A>& gv, const Vectorized<A>& sv, const Vectorized<A>& ev)
                     SE_ALWAYS_INLINE_LAMBDA {
    return gate == Gate::kSigmoid ? gv * (one - sv) * sv
                                  : Vectorized<A>::blendv(zero, gv / six, (ev > zero - three) & (ev < three));
  };
  for_values<A>(n, [&](int64_t i, int64_t count) SE_ALWAYS_INLINE_LAMBDA {
    Vectorized<A> g0, g1, s0, s1, e0, e1;
    load(g + i, g0, g1, count);
    load(s + i, s0, s1, count);
    load(e + i, e0, e1, count);
    store(g + i, f(g0, s0, e0), f(g1, s1, e1), count);
  });
}

// v[i] /= d for i < n.
template <typename A>
void divide_values(A* v, int64_t n, A d) {
  const Vectorized<A> vd(d);
  for_values<A>(n, [&](int64_t i, int64_t count) SE_ALWAYS_INLINE_LAMBDA {
    Vectorized<A> v0, v1;
    load(v + i, v0, v1, count);
    store(v + i, v0 / vd, v1 / vd, count);
  });
}

template <typename W>
const W* optional_data(const c10::optional<Tensor>& t) {
  return t ? t->data_ptr<W>() : nullptr;
}

// ----------------------------------------------------------------------------- forward and backward

template <typename T, typename W>
void forward_typed(const ForwardCall& call, const Parameters& params) {
  using A = Acc<T>;
  const ForwardArgs& args = call.args;
  const int64_t N = args.n, C = args.c, R = args.r, P = args.p;
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  A* z = call.z.data_ptr<A>();
  A* a = call.a.data_ptr<A>();
  A* e = call.e.data_ptr<A>();
  Tensor s = at::empty_like(call.z);  // the scales gate(e)
  const int64_t group = group_size(N, C, P, sizeof(T), 1);
  const bool stream = N * C * P * static_cast<int64_t>(sizeof(T)) > kStreamBytes;
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    const int64_t n1 = std::min(N, n0 + group), G = n1 - n0;
    channel_sums<false, T, A>(n0, n1, C, P, x, args.x_strides, x, args.x_strides, z);
    divide_values(z + n0 * C, G * C, static_cast<A>(P));
    dot_rows<W, A>(z + n0 * C, G, C, params.w1.data_ptr<W>(), optional_data<W>(params.b1), R, a + n0 * R);
    const Tensor hg = activation(call.a.narrow(0, n0, G), args.act);
    dot_rows<W, A>(hg.data_ptr<A>(), G, R, params.w2.data_ptr<W>(), optional_data<W>(params.b2), C, e + n0 * C);
    gate_values(e + n0 * C, s.data_ptr<A>() + n0 * C, G * C, args.gate);
    const T* residual = static_cast<const T*>(args.residual);
    with_bool(stream, [&](auto streaming) {
      with_out_act(args.out_act, [&](auto out) {
        with_bool(residual != nullptr, [&](auto has_residual) {
          scale_channels<false, streaming.value, out.value, has_residual.value, T, A>(
              n0, n1, C, P, x, args.x_strides, y, args.y_strides, s.data_ptr<A>(), nullptr, residual,
              args.residual_strides);
        });
      });
    });
  }
}

template <typename T, typename W>
void backward_typed(const BackwardCall& call, const Parameters& params, const Tensor& z, const Tensor& a,
                    const Tensor& e) {
  using A = Acc<T>;
  const BackwardArgs& args = call.args;
  const int64_t N = args.n, C = args.c, R = args.r, P = args.p;
  const T* x = static_cast<const T*>(args.x);
  A* de = call.de.data_ptr<A>();  // holds Σ g·x until the MLP backward turns it into de
  A* da = call.da.data_ptr<A>();
  A* dzp = call.dzp.data_ptr<A>();
  Tensor s = at::empty_like(e), dh = at::empty_like(a);
  gate_values(e.data_ptr<A>(), s.data_ptr<A>(), N * C, args.gate);
  // With a residual tail, the gradient at its input dt replaces grad_y from here on: written per group
  // into d_residual (or a scratch tensor when d_residual is not asked for) and re-read from the cache.
  const bool tail = args.out_act != OutAct::kNone;
  const T* g = static_cast<const T*>(args.grad_y);
  Strides3 g_strides = args.g_strides;
  T* dt = nullptr;
  Tensor scratch;
  if (tail) {
    if (args.d_residual) {
      dt = static_cast<T*>(args.d_residual), g_strides = args.d_residual_strides;
    } else {
      scratch = at::empty_like(call.x);
      dt = scratch.data_ptr<T>();
      g_strides = {scratch.stride(0), scratch.stride(1), scratch.size(3) == 1 ? scratch.stride(2) : scratch.stride(3)};
    }
  }
  const int64_t group = group_size(N, C, P, sizeof(T), tail ? 3 : 2);
  const bool stream = N * C * P * static_cast<int64_t>(sizeof(T)) > kStreamBytes;
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    const int64_t n1 = std::min(N, n0 + group), G = n1 - n0;
    if (tail) {
      const bool relu = args.out_act == OutAct::kRelu;
      const T* u = static_cast<const T*>(relu ? args.y : args.x);
      const T* residual = static_cast<const T*>(args.residual);
      with_out_act(args.out_act, [&](auto out) {
        with_bool(!relu && residual != nullptr, [&](auto has_residual) {
          if constexpr (out.value != 0) {
            tail_gradient<out.value, has_residual.value, T, A>(
                n0, n1, C, P, static_cast<const T*>(args.grad_y), args.g_strides, u, relu ? args.y_strides : args.x_strides,
                residual, args.residual_strides, s.data_ptr<A>(), dt, g_strides);
          }
        });
      });
      g = dt;
    }
    channel_sums<true, T, A>(n0, n1, C, P, g, g_strides, x, args.x_strides, de);
    gate_grad_values(de + n0 * C, s.data_ptr<A>() + n0 * C, e.data_ptr<A>() + n0 * C, G * C, args.gate);
    Tensor dag = call.da.narrow(0, n0, G), ag = a.narrow(0, n0, G), dhg = dh.narrow(0, n0, G);
    axpy_rows<W, A>(de + n0 * C, G, C, params.w2.data_ptr<W>(), R, A(1), dh.data_ptr<A>() + n0 * R);
    if (args.act == Act::kRelu) {
      at::threshold_backward_out(dag, dhg, ag, 0);
    } else {
      at::silu_backward_out(dag, dhg, ag);
    }
    axpy_rows<W, A>(da + n0 * R, G, R, params.w1.data_ptr<W>(), C, A(1) / static_cast<A>(P), dzp + n0 * C);
    if (args.dx) {
      with_bool(stream, [&](auto streaming) {
        scale_channels<true, streaming.value, 0, false, T, A>(n0, n1, C, P, g, g_strides, static_cast<T*>(args.dx),
                                                              args.dx_strides, s.data_ptr<A>(), dzp);
      });
    }
  }
  if (!args.dw1) return;
  const Tensor h = activation(a, args.act);
  outer_sums<W, A>(de, h.data_ptr<A>(), N, C, R, static_cast<W*>(args.dw2));
  outer_sums<W, A>(da, z.data_ptr<A>(), N, R, C, static_cast<W*>(args.dw1));
  if (call.db1.numel()) call.db1.copy_(call.da.sum(0));
  if (call.db2.numel()) call.db2.copy_(call.de.sum(0));
}

// Calls body(T{}, W{}) for the (x dtype, parameter dtype) pairs the binding admits.
template <typename Args, typename Body>
void dispatch_types(const Args& args, const Body& body) {
  using c10::BFloat16;
  using c10::Half;
  const DType x = args.x_dtype, p = args.param_dtype;
  if (x == DType::kFloat) return body(float{}, float{});
  if (x == DType::kDouble) return body(double{}, double{});
  if (x == DType::kHalf) return p == DType::kHalf ? body(Half{}, Half{}) : body(Half{}, float{});
  if (x == DType::kBFloat16) return p == DType::kBFloat16 ? body(BFloat16{}, BFloat16{}) : body(BFloat16{}, float{});
}

void forward(const ForwardCall& call, const Parameters& params) {
  dispatch_types(call.args, [&](auto t, auto w) { forward_typed<decltype(t), decltype(w)>(call, params); });
}

void backward(const BackwardCall& call, const Parameters& params, const Tensor& z, const Tensor& a,
              const Tensor& e) {
  dispatch_types(call.args, [&](auto t, auto w) { backward_typed<decltype(t), decltype(w)>(call, params, z, a, e); });
}

}  // namespace se_fused::cpu::CPU_CAPABILITY
