// The CPU kernel built for AVX-512 (x86-64, GCC); se_cpu.cpp picks it at run time.
// ATen and c10 come first, without the target, so the inline code every object file shares
// stays baseline; only the Vectorized classes (in at::vec::AVX512) and the kernel
// (in se_fused::cpu::AVX512) are compiled for the wider instructions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "se_cpu.h"

#ifdef SE_FUSED_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC's target pragma enables the instructions, not the macros that sleef.h (included by ATen's
// vector headers) tests before declaring its vector functions.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "se_cpu_kernel.h"
#pragma GCC pop_options
#endif
