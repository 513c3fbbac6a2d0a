/*
 * combine_lab.cu - the routed matmul's deterministic combine (cuda/cond.cu,
 * cd_combine_kernel), two ways, compared bit for bit and timed.
 *
 *   combine_lab B S D [E [UNUSED [RESIDUAL [REPS]]]]
 *
 * B examples of S slots each; every used (example, slot) pair names one of E
 * experts (default 64; UNUSED, default 0.1, is the fraction of slots left
 * empty, id -1).  The pairs are counting-sorted by expert as the layer sorts
 * them (stable), so pos[b S + s] is the pair's row in the sorted outputs
 * src [n, D] and -1 for an empty slot.  Then
 *   dst[b, j] = sum over s in slot order of w[b S + s] * src[pos, j]
 *               (+ add[b, j] when RESIDUAL, default 1)
 * in float, each product and sum rounded on its own (__fmul_rn/__fadd_rn on
 * the device, a volatile product on the host), so every version gives the
 * same bits.  Two modes: "weighted" (the forward's combine, w the routing
 * weights, add the residual x) and "unweighted" (the backward's dx gather, no
 * w, add the residual dy).  Versions:
 *   v0_thread  one thread per (example, column), as cd_combine_kernel
 *   v1_warp    one warp per example row; float4 loads and stores when
 *              D % 4 == 0 (the lines say "vectorised"), scalar lanes otherwise
 * Each is compared with the host reference and v1 with v0 (memcmp: bitwise),
 * then timed with CUDA events (WARM runs, then the median of REPS, default 50)
 * against cudaMemcpyAsync (device to device) moving the same bytes: a copy of
 * bytes/2 reads bytes/2 and writes bytes/2, where bytes counts what the
 * combine reads (the used src rows, pos, w, add) and writes (dst).
 *
 * Output: one JSON line per (version, mode), and one per mode for the
 * memcpy.  Exit 0, 1 on an error or a mismatch, 2 on bad arguments, 77
 * without a CUDA device.
 */
#include "lab_common.cuh"

#define BLOCK 256
#define WARM 5
#define MAX_GRID (65535u * 8u) /* cuda_common.cuh's ccr_grid cap */

/* v0: cd_combine_kernel's scheme, a thread per (example, column). */
__global__ void combine_thread_kernel(const float *src, const int *pos, const float *weights,
                                      const float *add, size_t batch, size_t S, size_t n,
                                      float *dst)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < batch * n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t b = i / n, j = i % n;
        float y = 0.0f;
        for (size_t s = 0; s < S; s++) {
            const int q = pos[b * S + s];
            if (q < 0)
                continue;
            const float o = src[(size_t)q * n + j];
            y = __fadd_rn(y, weights ? __fmul_rn(weights[b * S + s], o) : o);
        }
        if (add != NULL)
            y = __fadd_rn(y, add[i]);
        dst[i] = y;
    }
}

/* The v1 update of one column: the same operations as v0's. */
__device__ __forceinline__ float combine_step(float y, const float *w, float o)
{
    return __fadd_rn(y, w ? __fmul_rn(*w, o) : o);
}

/* v1: a warp per example (grid-stride over examples).  Lane l handles columns
 * l, l + 32, ... (VEC: the float4 columns 4 l .. 4 l + 3, then + 128, ...);
 * the slot loop is inside, so a column's sum runs in slot order as in v0.
 * pos and w are read by all lanes at once (one broadcast transaction). */
template <bool VEC>
__global__ void combine_warp_kernel(const float *src, const int *pos, const float *weights,
                                    const float *add, size_t batch, size_t S, size_t n,
                                    float *dst)
{
    const unsigned lane = threadIdx.x & 31u;
    const size_t nwarps = ((size_t)gridDim.x * blockDim.x) >> 5;
    for (size_t b = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5; b < batch;
         b += nwarps) {
        const int *pb = pos + b * S;
        const float *wb = weights ? weights + b * S : NULL;
        if (VEC) {
            const size_t n4 = n / 4;
            for (size_t j4 = lane; j4 < n4; j4 += 32) {
                float4 y = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                for (size_t s = 0; s < S; s++) {
                    const int q = __ldg(pb + s);
                    if (q < 0)
                        continue;
                    const float4 o = __ldg((const float4 *)(src + (size_t)q * n) + j4);
                    const float *w = wb ? wb + s : NULL;
                    y.x = combine_step(y.x, w, o.x);
                    y.y = combine_step(y.y, w, o.y);
                    y.z = combine_step(y.z, w, o.z);
                    y.w = combine_step(y.w, w, o.w);
                }
                if (add != NULL) {
                    const float4 a = __ldg((const float4 *)(add + b * n) + j4);
                    y.x = __fadd_rn(y.x, a.x);
                    y.y = __fadd_rn(y.y, a.y);
                    y.z = __fadd_rn(y.z, a.z);
                    y.w = __fadd_rn(y.w, a.w);
                }
                ((float4 *)(dst + b * n))[j4] = y;
            }
        } else {
            for (size_t j = lane; j < n; j += 32) {
                float y = 0.0f;
                for (size_t s = 0; s < S; s++) {
                    const int q = __ldg(pb + s);
                    if (q < 0)
                        continue;
                    y = combine_step(y, wb ? wb + s : NULL, __ldg(src + (size_t)q * n + j));
                }
                if (add != NULL)
                    y = __fadd_rn(y, __ldg(add + b * n + j));
                dst[b * n + j] = y;
            }
        }
    }
}

typedef struct lab {
    size_t B, S, d, E, n; /* n: used pairs = rows of src */
    double unused;
    bool residual;
    int reps;
    char device[300];
    cudaStream_t st;
    bool have_st;
    float *d_src, *d_w, *d_add, *d_dst, *d_cpy[2];
    int *d_pos;
    float *h_src, *h_w, *h_add, *h_ref, *h_got, *h_v0, *ms;
    int *h_pos, *h_ids;
    size_t *h_cnt;
    /* the current run */
    bool weighted, vec;
    size_t copy_bytes;
} lab;

static void lab_free(lab *L)
{
    if (L->have_st)
        cudaStreamDestroy(L->st);
    void *dev[] = {L->d_src, L->d_w, L->d_add, L->d_dst, L->d_cpy[0], L->d_cpy[1], L->d_pos};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++)
        if (dev[i] != NULL)
            cudaFree(dev[i]);
    void *host[] = {L->h_src, L->h_w, L->h_add, L->h_ref, L->h_got, L->h_v0, L->ms,
                    L->h_pos, L->h_ids, L->h_cnt};
    for (size_t i = 0; i < sizeof host / sizeof *host; i++)
        free(host[i]);
}

template <typename T> static bool lab_alloc(T **p, size_t n)
{
    size_t bytes;
    *p = lab_mul(n ? n : 1, sizeof(T), &bytes) ? (T *)malloc(bytes) : NULL;
    return *p != NULL;
}

#define HOST_ALLOC(p, n) \
    LAB_TRY(lab_alloc(&(p), (n)), "cannot allocate %s (%zu elements)", #p, (size_t)(n))

static unsigned grid_for(size_t threads)
{
    size_t g = (threads + BLOCK - 1) / BLOCK;
    return g == 0 ? 1u : g > MAX_GRID ? MAX_GRID : (unsigned)g;
}

static int run_v0(void *arg)
{
    lab *L = (lab *)arg;
    combine_thread_kernel<<<grid_for(L->B * L->d), BLOCK, 0, L->st>>>(
        L->d_src, L->d_pos, L->weighted ? L->d_w : NULL, L->residual ? L->d_add : NULL, L->B,
        L->S, L->d, L->d_dst);
    LAB_LAUNCHED();
    return 0;
}

static int run_v1(void *arg)
{
    lab *L = (lab *)arg;
    const float *w = L->weighted ? L->d_w : NULL, *add = L->residual ? L->d_add : NULL;
    const unsigned grid = grid_for(L->B * 32);
    if (L->vec)
        combine_warp_kernel<true><<<grid, BLOCK, 0, L->st>>>(L->d_src, L->d_pos, w, add, L->B,
                                                             L->S, L->d, L->d_dst);
    else
        combine_warp_kernel<false><<<grid, BLOCK, 0, L->st>>>(L->d_src, L->d_pos, w, add, L->B,
                                                              L->S, L->d, L->d_dst);
    LAB_LAUNCHED();
    return 0;
}

static int run_memcpy(void *arg)
{
    lab *L = (lab *)arg;
    LAB_CUDA(cudaMemcpyAsync(L->d_cpy[1], L->d_cpy[0], L->copy_bytes, cudaMemcpyDeviceToDevice,
                             L->st));
    return 0;
}

/* The host reference of the current mode, in the kernels' float order. */
static void host_reference(lab *L)
{
    const size_t S = L->S, d = L->d;
    for (size_t b = 0; b < L->B; b++) {
        for (size_t j = 0; j < d; j++) {
            float y = 0.0f;
            for (size_t s = 0; s < S; s++) {
                int q = L->h_pos[b * S + s];
                if (q < 0)
                    continue;
                /* volatile: the product rounded to float on its own, never
                 * contracted into an FMA with the sum */
                volatile float p = L->h_src[(size_t)q * d + j];
                if (L->weighted)
                    p = L->h_w[b * S + s] * p;
                y = y + p;
            }
            if (L->residual)
                y = y + L->h_add[b * d + j];
            L->h_ref[b * d + j] = y;
        }
    }
}

/* Runs fn once into a NaN-filled dst; out[] receives it. */
static int run_once(lab *L, lab_fn fn, float *out)
{
    LAB_CUDA(cudaMemsetAsync(L->d_dst, 0xFF, L->B * L->d * sizeof(float), L->st));
    if (fn(L) != 0)
        return 1;
    LAB_CUDA(cudaStreamSynchronize(L->st));
    LAB_CUDA(cudaMemcpy(out, L->d_dst, L->B * L->d * sizeof(float), cudaMemcpyDeviceToHost));
    return 0;
}

/* Index of the first float whose bits differ, or SIZE_MAX. */
static size_t first_diff(const float *a, const float *b, size_t n)
{
    if (memcmp(a, b, n * sizeof(float)) == 0)
        return SIZE_MAX;
    for (size_t i = 0; i < n; i++)
        if (memcmp(a + i, b + i, sizeof(float)) != 0)
            return i;
    return SIZE_MAX;
}

static void print_line(const lab *L, const char *version, const char *mode, size_t bytes,
                       double sec, double mgbps, const char *equal)
{
    char dev[700], n0[32], n1[32], n2[32], n3[32];
    lab_json_escape(L->device, dev, sizeof dev);
    const double gbps = (double)bytes / sec * 1e-9;
    printf("{\"lab\":\"combine\",\"version\":\"%s\",\"mode\":\"%s\",\"B\":%zu,\"S\":%zu,"
           "\"d\":%zu,\"E\":%zu,\"rows\":%zu,\"residual\":%s,\"vectorised\":%s,\"bytes\":%zu,"
           "\"seconds\":%s,\"GBps\":%s,\"memcpy_GBps\":%s,\"ratio_to_memcpy\":%s,"
           "%s\"reps\":%d,\"device\":\"%s\"}\n",
           version, mode, L->B, L->S, L->d, L->E, L->n, L->residual ? "true" : "false",
           L->vec && strcmp(version, "v1_warp") == 0 ? "true" : "false", bytes,
           lab_num(n0, sizeof n0, "%.6e", sec), lab_num(n1, sizeof n1, "%.2f", gbps),
           lab_num(n2, sizeof n2, "%.2f", mgbps), lab_num(n3, sizeof n3, "%.4f", gbps / mgbps),
           equal, L->reps, dev);
    fflush(stdout);
}

/* Checks and times both versions in one mode; *failed set by a mismatch. */
static int run_mode(lab *L, bool weighted, bool *failed)
{
    const char *mode = weighted ? "weighted" : "unweighted";
    const size_t nd = L->B * L->d;
    L->weighted = weighted;
    host_reference(L);
    /* The bytes the combine moves: used src rows (each read once), pos and
     * w of every slot, add, dst. */
    size_t bytes = L->n * L->d * sizeof(float) + L->B * L->S * sizeof(int) + nd * sizeof(float);
    if (weighted)
        bytes += L->B * L->S * sizeof(float);
    if (L->residual)
        bytes += nd * sizeof(float);
    L->copy_bytes = bytes / 2;
    double memcpy_sec;
    if (lab_time(run_memcpy, L, L->st, WARM, L->reps, L->ms, &memcpy_sec) != 0)
        return 1;
    /* a copy's traffic: read and write */
    const double mgbps = 2.0 * (double)L->copy_bytes / memcpy_sec * 1e-9;
    print_line(L, "memcpy", mode, 2 * L->copy_bytes, memcpy_sec, mgbps, "");

    static const char *const names[] = {"v0_thread", "v1_warp"};
    static const lab_fn fns[] = {run_v0, run_v1};
    for (int v = 0; v < 2; v++) {
        float *got = v == 0 ? L->h_v0 : L->h_got;
        if (run_once(L, fns[v], got) != 0)
            return 1;
        size_t i = first_diff(got, L->h_ref, nd);
        bool eq_host = i == SIZE_MAX, eq_v0 = v == 0 || first_diff(got, L->h_v0, nd) == SIZE_MAX;
        if (!eq_host) {
            fprintf(stderr, "%s %s: [%zu] (example %zu, column %zu) got %.9g want %.9g (host)\n",
                    names[v], mode, i, i / L->d, i % L->d, (double)got[i], (double)L->h_ref[i]);
            *failed = true;
        }
        if (!eq_v0) {
            fprintf(stderr, "%s %s: differs from v0_thread\n", names[v], mode);
            *failed = true;
        }
        double sec;
        if (lab_time(fns[v], L, L->st, WARM, L->reps, L->ms, &sec) != 0)
            return 1;
        char equal[96];
        snprintf(equal, sizeof equal, "\"bitwise_equal_host\":%s,\"bitwise_equal_v0\":%s,",
                 eq_host ? "true" : "false", eq_v0 ? "true" : "false");
        print_line(L, names[v], mode, bytes, sec, mgbps, equal);
    }
    return 0;
}

static int run(lab *L)
{
    const size_t B = L->B, S = L->S, d = L->d, E = L->E;
    size_t P, nd, t;
    /* P x D x 16 and B x D x 16 bytes fit: every sum of sizes below does */
    LAB_TRY(lab_mul(B, S, &P) && P <= INT_MAX && lab_mul(B, d, &nd) && lab_mul(P, d, &t) &&
                lab_mul(t, 4 * sizeof(float), &t) && lab_mul(nd, 4 * sizeof(float), &t),
            "sizes overflow (B x S must stay below 2^31)");
    HOST_ALLOC(L->h_ids, P);
    HOST_ALLOC(L->h_pos, P);
    HOST_ALLOC(L->h_w, P);
    HOST_ALLOC(L->h_cnt, E);
    HOST_ALLOC(L->h_add, nd);
    HOST_ALLOC(L->h_ref, nd);
    HOST_ALLOC(L->h_got, nd);
    HOST_ALLOC(L->h_v0, nd);
    HOST_ALLOC(L->ms, (size_t)L->reps);

    /* The routing: ids, then the stable counting sort by id (cond_sort). */
    uint64_t seed = 0x636F6D62696E65ull; /* "combine" */
    L->n = 0;
    memset(L->h_cnt, 0, E * sizeof *L->h_cnt);
    for (size_t p = 0; p < P; p++) {
        bool empty = (double)lab_uniform(&seed, 0.0f, 1.0f) < L->unused;
        L->h_ids[p] = empty ? -1 : (int)(lab_next(&seed) % E);
        L->h_w[p] = lab_uniform(&seed, 0.0f, 1.0f);
        if (!empty) {
            L->h_cnt[L->h_ids[p]]++;
            L->n++;
        }
    }
    size_t off = 0;
    for (size_t e = 0; e < E; e++) {
        size_t c = L->h_cnt[e];
        L->h_cnt[e] = off;
        off += c;
    }
    for (size_t p = 0; p < P; p++)
        L->h_pos[p] = L->h_ids[p] < 0 ? -1 : (int)L->h_cnt[L->h_ids[p]]++;
    HOST_ALLOC(L->h_src, L->n * d);
    for (size_t i = 0; i < L->n * d; i++)
        L->h_src[i] = lab_uniform(&seed, -1.0f, 1.0f);
    for (size_t i = 0; i < nd; i++)
        L->h_add[i] = lab_uniform(&seed, -1.0f, 1.0f);

    LAB_CUDA(cudaStreamCreateWithFlags(&L->st, cudaStreamNonBlocking));
    L->have_st = true;
    LAB_CUDA(cudaMalloc((void **)&L->d_src, (L->n ? L->n : 1) * d * sizeof(float)));
    LAB_CUDA(cudaMalloc((void **)&L->d_pos, P * sizeof(int)));
    LAB_CUDA(cudaMalloc((void **)&L->d_w, P * sizeof(float)));
    LAB_CUDA(cudaMalloc((void **)&L->d_add, nd * sizeof(float)));
    LAB_CUDA(cudaMalloc((void **)&L->d_dst, nd * sizeof(float)));
    /* the memcpy's buffers: at most half of what the combine moves */
    size_t cap = (L->n * d + nd * 3 + 2 * P) * sizeof(float) / 2 + 16;
    LAB_CUDA(cudaMalloc((void **)&L->d_cpy[0], cap));
    LAB_CUDA(cudaMalloc((void **)&L->d_cpy[1], cap));
    LAB_CUDA(cudaMemset(L->d_cpy[0], 0, cap));
    LAB_CUDA(cudaMemcpy(L->d_src, L->h_src, L->n * d * sizeof(float), cudaMemcpyHostToDevice));
    LAB_CUDA(cudaMemcpy(L->d_pos, L->h_pos, P * sizeof(int), cudaMemcpyHostToDevice));
    LAB_CUDA(cudaMemcpy(L->d_w, L->h_w, P * sizeof(float), cudaMemcpyHostToDevice));
    LAB_CUDA(cudaMemcpy(L->d_add, L->h_add, nd * sizeof(float), cudaMemcpyHostToDevice));
    /* float4 needs D % 4 == 0 and 16-byte aligned rows (cudaMalloc's are). */
    L->vec = d % 4 == 0 && ((uintptr_t)L->d_src | (uintptr_t)L->d_add |
                            (uintptr_t)L->d_dst) % 16 == 0;

    bool failed = false;
    if (run_mode(L, true, &failed) != 0 || run_mode(L, false, &failed) != 0)
        return 1;
    return failed ? 1 : 0;
}

int main(int argc, char **argv)
{
    lab L;
    memset(&L, 0, sizeof L);
    bool ok = argc >= 4 && argc <= 8;
    if (ok) {
        L.B = lab_parse_size(argv[1], INT_MAX);
        L.S = lab_parse_size(argv[2], INT_MAX);
        L.d = lab_parse_size(argv[3], INT_MAX);
        L.E = argc > 4 ? lab_parse_size(argv[4], INT_MAX) : 64;
        L.unused = 0.1;
        if (argc > 5) {
            char *end;
            L.unused = strtod(argv[5], &end);
            ok = *end == '\0' && end != argv[5] && L.unused >= 0.0 && L.unused <= 1.0;
        }
        L.residual = true;
        if (argc > 6) {
            ok = ok && (strcmp(argv[6], "0") == 0 || strcmp(argv[6], "1") == 0);
            L.residual = strcmp(argv[6], "1") == 0;
        }
        L.reps = argc > 7 ? (int)lab_parse_size(argv[7], 100000) : 50;
        ok = ok && L.B && L.S && L.d && L.E && L.reps;
    }
    if (!ok) {
        fprintf(stderr, "usage: %s B S D [E [UNUSED [RESIDUAL [REPS]]]]\n"
                        "  B examples, S slots, D columns, E experts (64), UNUSED fraction of\n"
                        "  empty slots in [0, 1] (0.1), RESIDUAL 0 or 1 (1), REPS (50)\n",
                argv[0]);
        return 2;
    }
    int rc = lab_device(L.device, sizeof L.device);
    if (rc == 0)
        rc = run(&L);
    lab_free(&L);
    return rc;
}
