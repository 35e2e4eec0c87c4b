// The CPU kernel built for the compiler's baseline instruction set; se_cpu.cpp picks it at run time.
// ATen and c10 come first, without the target, so the inline code every object file shares
// stays baseline; only the Vectorized classes (in at::vec::DEFAULT) and the kernel
// (in se_fused::cpu::DEFAULT) are compiled for the wider instructions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "se_cpu.h"

#define CPU_CAPABILITY DEFAULT
#include "se_cpu_kernel.h"
