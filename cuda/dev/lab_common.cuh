/*
 * lab_common.cuh - what the lab programs of cuda/dev/ share: error checks that
 * print and return 1 (never abort), the "no device: exit 77" probe, argument
 * parsing, a deterministic generator, event timing (median of N) and JSON
 * output.  Header-only; the labs do not link libccr.
 */
#ifndef CCR_LAB_COMMON_CUH
#define CCR_LAB_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Exit status of a lab run on a machine without a CUDA device (meson: skipped). */
#define LAB_SKIP 77

/* A failing CUDA runtime / cuBLAS call or launch: print, return 1. */
#define LAB_CUDA(expr)                                                                  \
    do {                                                                                \
        cudaError_t lab_e_ = (expr);                                                    \
        if (lab_e_ != cudaSuccess) {                                                    \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,               \
                    cudaGetErrorString(lab_e_));                                        \
            return 1;                                                                   \
        }                                                                               \
    } while (0)

#define LAB_CUBLAS(expr)                                                                \
    do {                                                                                \
        cublasStatus_t lab_b_ = (expr);                                                 \
        if (lab_b_ != CUBLAS_STATUS_SUCCESS) {                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,               \
                    cublasGetStatusString(lab_b_));                                     \
            return 1;                                                                   \
        }                                                                               \
    } while (0)

#define LAB_LAUNCHED() LAB_CUDA(cudaGetLastError())

/* Anything else that fails (a host allocation, a check): print, return 1. */
#define LAB_TRY(cond, ...)                                                              \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                             \
            fprintf(stderr, __VA_ARGS__);                                               \
            fputc('\n', stderr);                                                        \
            return 1;                                                                   \
        }                                                                               \
    } while (0)

/* 0 when a CUDA device is present (its name in name[len]), LAB_SKIP with the
 * reason printed when none is (no driver, no device), 1 on another error. */
static inline int lab_device(char *name, size_t len)
{
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();
        printf("SKIP: no CUDA device (%s)\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "device count is 0");
        return LAB_SKIP;
    }
    cudaDeviceProp prop;
    LAB_CUDA(cudaSetDevice(0));
    LAB_CUDA(cudaGetDeviceProperties(&prop, 0));
    snprintf(name, len, "%s (sm_%d%d)", prop.name, prop.major, prop.minor);
    return 0;
}

/* s as a JSON string body (quotes and control characters escaped). */
static inline void lab_json_escape(const char *s, char *out, size_t len)
{
    size_t o = 0;
    for (; *s != '\0' && o + 7 < len; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(out + o, len - o, "\\u%04x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
}

/* v formatted with fmt into buf, or "null" when it is NaN or infinite (a
 * JSON number cannot be either). */
static inline const char *lab_num(char *buf, size_t len, const char *fmt, double v)
{
    if (v != v || v - v != 0.0)
        return "null";
    snprintf(buf, len, fmt, v);
    return buf;
}

/* A positive integer argument no larger than max; 0 when it is not one. */
static inline size_t lab_parse_size(const char *s, size_t max)
{
    char *end;
    errno = 0;
    if (s[0] == '-' || s[0] == '\0')
        return 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0' || v == 0 || v > max)
        return 0;
    return (size_t)v;
}

/* a * b, false on overflow. */
static inline bool lab_mul(size_t a, size_t b, size_t *out)
{
    if (b != 0 && a > SIZE_MAX / b)
        return false;
    *out = a * b;
    return true;
}

/* splitmix64: a deterministic stream (no libc rand). */
static inline uint64_t lab_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi) with 24 random bits. */
static inline float lab_uniform(uint64_t *s, float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(lab_next(s) >> 40) * (1.0 / 16777216.0));
}

static inline int lab_cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* The work timed by lab_time: returns 0, or 1 after printing an error. */
typedef int (*lab_fn)(void *arg);

/* Runs fn warm times, then reps (>= 1) times each between two events on
 * stream st; *seconds = the median.  ms[reps] is the caller's scratch. */
static inline int lab_time(lab_fn fn, void *arg, cudaStream_t st, int warm, int reps, float *ms,
                           double *seconds)
{
    cudaEvent_t ev[2];
    LAB_CUDA(cudaEventCreate(&ev[0]));
    cudaError_t e = cudaEventCreate(&ev[1]);
    if (e != cudaSuccess) {
        cudaEventDestroy(ev[0]);
        fprintf(stderr, "lab_time: cudaEventCreate: %s\n", cudaGetErrorString(e));
        return 1;
    }
    int rc = 0;
    for (int i = 0; i < warm && rc == 0; i++)
        rc = fn(arg);
    if (rc == 0)
        e = cudaStreamSynchronize(st);
    for (int i = 0; i < reps && rc == 0 && e == cudaSuccess; i++) {
        e = cudaEventRecord(ev[0], st);
        if (e == cudaSuccess)
            rc = fn(arg);
        if (rc == 0 && e == cudaSuccess)
            e = cudaEventRecord(ev[1], st);
        if (rc == 0 && e == cudaSuccess)
            e = cudaEventSynchronize(ev[1]);
        if (rc == 0 && e == cudaSuccess)
            e = cudaEventElapsedTime(&ms[i], ev[0], ev[1]);
    }
    cudaEventDestroy(ev[0]);
    cudaEventDestroy(ev[1]);
    if (e != cudaSuccess)
        fprintf(stderr, "lab_time: %s\n", cudaGetErrorString(e));
    if (rc != 0 || e != cudaSuccess)
        return 1;
    qsort(ms, (size_t)reps, sizeof *ms, lab_cmp_float);
    double med = reps % 2 ? ms[reps / 2] : 0.5 * ((double)ms[reps / 2 - 1] + ms[reps / 2]);
    *seconds = med * 1e-3;
    return 0;
}

#endif /* CCR_LAB_COMMON_CUH */
