/*
 * cpu_features.c - the CPU features that decide the OpenBLAS core, and the
 * rule that picks it (src/blas_core.h; docs/DESIGN.md, "BLAS core").
 */
#include <stddef.h>
#include <strings.h>

#include "blas_core.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static unsigned long long xcr0(void)
{
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

unsigned ccr_cpu_features(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx) return 0;
    const unsigned long long x = xcr0();
    if ((x & 0x6) != 0x6) return 0; /* XMM and YMM state */
    unsigned f = CCR_CPU_AVX;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
    const int avx2 = (b >> 5) & 1;
    if (avx2 && fma) f |= CCR_CPU_AVX2FMA;
    const unsigned need = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);
    if ((f & CCR_CPU_AVX2FMA) && (b & need) == need && (x & 0xe0) == 0xe0)
        f |= CCR_CPU_AVX512; /* F DQ CD BW VL; opmask, ZMM_Hi256, Hi16_ZMM state */
    return f;
}
#else
unsigned ccr_cpu_features(void) { return 0; }
#endif

/* OpenBLAS 0.3.21's x86 core names (driver/others/dynamic.c) by class. */
static const struct {
    const char *name;
    int cls;
} core_classes[] = {
    {"SkylakeX", 4},    {"Cooperlake", 4}, {"SapphireRapids", 4}, {"Haswell", 3},
    {"Zen", 3},         {"Sandybridge", 2}, {"Bulldozer", 2},      {"Piledriver", 2},
    {"Steamroller", 2}, {"Excavator", 2},  {"Prescott", 1},       {"Katmai", 1},
    {"Coppermine", 1},  {"Northwood", 1},  {"Banias", 1},         {"Atom", 1},
    {"Core2", 1},       {"Penryn", 1},     {"Dunnington", 1},     {"Nehalem", 1},
    {"Athlon", 1},      {"Opteron", 1},    {"Opteron_SSE3", 1},   {"Barcelona", 1},
    {"Nano", 1},        {"Bobcat", 1},
};

int ccr_blas_core_class(const char *core)
{
    if (core == NULL) return -1;
    for (size_t i = 0; i < sizeof core_classes / sizeof core_classes[0]; i++)
        if (strcasecmp(core, core_classes[i].name) == 0) return core_classes[i].cls;
    return -1;
}

const char *ccr_blas_choose(unsigned features, const char *env_coretype, const char *env_l2,
                            const char *current, ccr_blas_src *src)
{
    *src = CCR_BLAS_SRC_OPENBLAS;
    if (env_coretype != NULL || env_l2 != NULL) {
        *src = CCR_BLAS_SRC_USER;
        return NULL;
    }
    const int have = ccr_blas_core_class(current);
    if (have < 0) return NULL;
    const char *best = NULL;
    int cls = 0;
    if (features & CCR_CPU_AVX512) {
        best = "SkylakeX";
        cls = 4;
    } else if (features & CCR_CPU_AVX2FMA) {
        best = "Haswell";
        cls = 3;
    } else if (features & CCR_CPU_AVX) {
        best = "Sandybridge";
        cls = 2;
    }
    if (best == NULL || cls <= have) return NULL;
    *src = CCR_BLAS_SRC_CCR;
    return best;
}
