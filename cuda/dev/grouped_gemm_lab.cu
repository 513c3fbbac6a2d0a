/*
 * grouped_gemm_lab.cu - the routed matmul's GEMMs (cuda/cond.cu,
 * cd_gemm_groups), three ways, checked and timed.
 *
 *   grouped_gemm_lab B D_IN D_OUT E DIST [REPS]
 *
 * B rows (routed (example, slot) pairs), already sorted by expert as the
 * layer's gather leaves them: group g holds rows off[g] .. off[g+1]-1 of X
 * [B, D_IN] and multiplies them by its expert's W_e [D_IN, D_OUT] (row-major,
 * W [E, D_IN, D_OUT]) into Y [B, D_OUT].  DIST gives the rows per expert:
 *   uniform  B/E each (the remainder to the first experts)
 *   zipf     (alias skewed) proportional to 1/(e+1)
 *   one      all B rows on expert 0
 *   tiny     1, 2, 3, 1, 2, 3, ... rows on experts 0, 1, 2, ... (deep tree
 *            levels, E >> B); rows left once the E experts are used are dealt
 *            round-robin, which makes some groups larger (said on stderr)
 *   all      each of the above in turn
 * Versions:
 *   v0_loop          one cublasSgemm per non-empty group
 *   v1_grouped       one cublasSgemmGroupedBatched call for all groups
 *   v2_tiny_grouped  groups of < TINY_ROWS rows to lab_tiny_kernel (one block
 *                    per group and column tile, the matrix read once), the
 *                    rest in one cublasSgemmGroupedBatched call (cond.cu's path)
 * Each is checked against a host reference in double (rows sampled when the
 * whole product is over CHECK_FLOPS: every group's first and last row, every
 * row of a tiny group, and every stride-th row): nmse = sum (y - ref)^2 /
 * sum ref^2 over the checked rows, failing above NMSE_TOL.  Then timed with
 * CUDA events (WARM runs, then the median of REPS, default 20) against ONE
 * dense cublasSgemm of the same FLOPs (X [B, D_IN] times W_0), FP32 without
 * TF32 as the library runs.  The host work of the layer (sort, shape arrays,
 * pointer upload) is outside the timed region.
 *
 * Output: one JSON line per version (and one for the dense sgemm).  Exit 0,
 * 1 on an error or a failed check, 2 on bad arguments, 77 without a CUDA
 * device.
 */
#include "lab_common.cuh"

#include <math.h>
#include <pthread.h>
#include <unistd.h>

#define TINY_ROWS 4      /* cond.cu's CD_TINY_ROWS */
#define TINY_BLOCK 256   /* columns per block of lab_tiny_kernel */
#define TINY_KT 128      /* k tile of X staged in shared memory */
#define CHECK_FLOPS 2e10 /* host reference budget per distribution */
#define NMSE_TOL 1e-5
#define WARM 3
#define MAX_THREADS 64

enum { D_UNIFORM, D_ZIPF, D_ONE, D_TINY, N_DIST };
static const char *const dist_names[N_DIST] = {"uniform", "zipf", "one", "tiny"};

/* C[q0 + r, :] = X[q0 + r, :] W_e for the r < rows (< TINY_ROWS) rows of the
 * tiny group blockIdx.x, tiny[3 g] = (q0, rows, e); blockIdx.y a tile of
 * TINY_BLOCK columns, a thread per column.  The group's rows are staged in
 * shared memory TINY_KT columns of X at a time, W_e's row k read coalesced,
 * the accumulators in registers. */
__global__ void lab_tiny_kernel(const int *tiny, const float *x, const float *w, float *y,
                                int d_in, int d_out)
{
    __shared__ float xs[TINY_ROWS - 1][TINY_KT];
    const int q0 = tiny[3 * blockIdx.x], rows = tiny[3 * blockIdx.x + 1];
    const float *wm = w + (size_t)tiny[3 * blockIdx.x + 2] * d_in * d_out;
    const int j = blockIdx.y * TINY_BLOCK + threadIdx.x;
    float acc[TINY_ROWS - 1] = {0.0f};
    for (int k0 = 0; k0 < d_in; k0 += TINY_KT) {
        const int kn = d_in - k0 < TINY_KT ? d_in - k0 : TINY_KT;
        __syncthreads(); /* the previous tile is read */
        for (int i = threadIdx.x; i < rows * kn; i += TINY_BLOCK)
            xs[i / kn][i % kn] = x[(size_t)(q0 + i / kn) * d_in + k0 + i % kn];
        __syncthreads();
        if (j >= d_out)
            continue;
        const float *wp = wm + (size_t)k0 * d_out + j;
#pragma unroll 4
        for (int kk = 0; kk < kn; kk++) {
            const float bv = wp[(size_t)kk * d_out];
#pragma unroll
            for (int r = 0; r < TINY_ROWS - 1; r++)
                if (r < rows)
                    acc[r] = fmaf(xs[r][kk], bv, acc[r]);
        }
    }
    if (j < d_out) {
#pragma unroll
        for (int r = 0; r < TINY_ROWS - 1; r++)
            if (r < rows)
                y[(size_t)(q0 + r) * d_out + j] = acc[r];
    }
}

typedef struct lab {
    size_t B, d_in, d_out, E;
    int reps;
    char device[300];
    cudaStream_t st;
    cublasHandle_t cb;
    bool have_st, have_cb;
    float *dX, *dW, *dY;               /* device X, W, Y */
    float *hX, *hW, *hY;               /* host twins */
    float *ms;                         /* [reps] timing scratch */
    /* the groups of the current distribution */
    size_t *cnt, *off;                 /* [E], [E + 1]: rows and first row per expert */
    int *rowexp;                       /* [B] row -> expert */
    size_t G, nbig, nt, max_rows;      /* non-empty, >= TINY_ROWS, < TINY_ROWS groups */
    int *gexp;                         /* [E] the non-empty groups' experts, ascending */
    /* cublasSgemmGroupedBatched's host arrays ([E] each, one entry per group) */
    cublasOperation_t *op;
    int *m, *n_all, *n_big, *k, *lda, *ldb, *ldc, *gsize;
    float *alpha, *beta;
    float **hptr, **dptr_all, **dptr_big; /* [3 E]: W, X, Y pointer runs */
    int *htiny, *dtiny;                /* [3 E]: (first row, rows, expert) */
    /* the host reference */
    size_t *chk, n_chk;                /* checked rows */
    double *ref;                       /* [n_chk, d_out] */
} lab;

static void lab_free(lab *L)
{
    if (L->have_cb)
        cublasDestroy(L->cb);
    if (L->have_st)
        cudaStreamDestroy(L->st);
    void *dev[] = {L->dX, L->dW, L->dY, L->dptr_all, L->dptr_big, L->dtiny};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++)
        if (dev[i] != NULL)
            cudaFree(dev[i]);
    void *host[] = {L->hX, L->hW, L->hY, L->ms, L->cnt, L->off, L->rowexp, L->gexp, L->op,
                    L->m, L->n_all, L->n_big, L->k, L->lda, L->ldb, L->ldc, L->gsize,
                    L->alpha, L->beta, L->hptr, L->htiny, L->chk, L->ref};
    for (size_t i = 0; i < sizeof host / sizeof *host; i++)
        free(host[i]);
}

/* Host allocation of n x size bytes (n >= 1), NULL on overflow or failure. */
static void *lab_host(size_t n, size_t size)
{
    size_t bytes;
    if (!lab_mul(n ? n : 1, size, &bytes))
        return NULL;
    return malloc(bytes);
}

template <typename T> static bool lab_alloc(T **p, size_t n)
{
    *p = (T *)lab_host(n, sizeof(T));
    return *p != NULL;
}

#define HOST_ALLOC(p, n) \
    LAB_TRY(lab_alloc(&(p), (n)), "cannot allocate %s (%zu elements)", #p, (size_t)(n))

/* Rows per expert of distribution dist (cnt[E], summing to B). */
static void make_counts(int dist, size_t B, size_t E, size_t *cnt)
{
    memset(cnt, 0, E * sizeof *cnt);
    if (dist == D_UNIFORM) {
        for (size_t e = 0; e < E; e++)
            cnt[e] = B / E + (e < B % E);
    } else if (dist == D_ZIPF) {
        double h = 0.0;
        for (size_t e = 0; e < E; e++)
            h += 1.0 / (double)(e + 1);
        size_t used = 0;
        for (size_t e = 0; e < E; e++) {
            cnt[e] = (size_t)floor((double)B / (h * (double)(e + 1)));
            used += cnt[e];
        }
        if (used > B) { /* rounding of the floor's argument: trim from the tail */
            for (size_t e = E; e-- > 0 && used > B;) {
                size_t t = cnt[e] < used - B ? cnt[e] : used - B;
                cnt[e] -= t;
                used -= t;
            }
        }
        for (size_t e = 0; used < B; e = (e + 1) % E, used++)
            cnt[e]++;
    } else if (dist == D_ONE) {
        cnt[0] = B;
    } else {
        size_t used = 0;
        for (size_t e = 0; e < E && used < B; e++) {
            size_t c = 1 + e % 3;
            cnt[e] = c < B - used ? c : B - used;
            used += cnt[e];
        }
        if (used < B)
            fprintf(stderr, "tiny: %zu rows left after %zu experts of 1-3 rows; dealt "
                    "round-robin (E >= B/2 keeps every group tiny)\n", B - used, E);
        for (size_t e = 0; used < B; e = (e + 1) % E, used++)
            cnt[e]++;
    }
}

/* ---- the versions ------------------------------------------------------------ */

static int run_dense(void *arg)
{
    lab *L = (lab *)arg;
    const float one = 1.0f, zero = 0.0f;
    /* Row-major Y = X W is column-major Y^T = W^T X^T. */
    LAB_CUBLAS(cublasSgemm(L->cb, CUBLAS_OP_N, CUBLAS_OP_N, (int)L->d_out, (int)L->B,
                           (int)L->d_in, &one, L->dW, (int)L->d_out, L->dX, (int)L->d_in, &zero,
                           L->dY, (int)L->d_out));
    return 0;
}

static int run_v0(void *arg)
{
    lab *L = (lab *)arg;
    const float one = 1.0f, zero = 0.0f;
    for (size_t g = 0; g < L->G; g++) {
        size_t e = (size_t)L->gexp[g], q0 = L->off[e];
        LAB_CUBLAS(cublasSgemm(L->cb, CUBLAS_OP_N, CUBLAS_OP_N, (int)L->d_out, (int)L->cnt[e],
                               (int)L->d_in, &one, L->dW + e * L->d_in * L->d_out,
                               (int)L->d_out, L->dX + q0 * L->d_in, (int)L->d_in, &zero,
                               L->dY + q0 * L->d_out, (int)L->d_out));
    }
    return 0;
}

/* One grouped call over ng groups whose pointer runs (W, X, Y; ng each) are
 * at dptr and whose row counts are n[]. */
static int grouped(lab *L, float **dptr, const int *n, size_t ng)
{
    LAB_CUBLAS(cublasSgemmGroupedBatched(
        L->cb, L->op, L->op, L->m, n, L->k, L->alpha, (const float *const *)dptr, L->lda,
        (const float *const *)(dptr + ng), L->ldb, L->beta, dptr + 2 * ng, L->ldc, (int)ng,
        L->gsize));
    return 0;
}

static int run_v1(void *arg)
{
    lab *L = (lab *)arg;
    return grouped(L, L->dptr_all, L->n_all, L->G);
}

static int run_v2(void *arg)
{
    lab *L = (lab *)arg;
    if (L->nbig > 0 && grouped(L, L->dptr_big, L->n_big, L->nbig) != 0)
        return 1;
    if (L->nt > 0) {
        dim3 grid((unsigned)L->nt, (unsigned)((L->d_out + TINY_BLOCK - 1) / TINY_BLOCK));
        lab_tiny_kernel<<<grid, TINY_BLOCK, 0, L->st>>>(L->dtiny, L->dX, L->dW, L->dY,
                                                        (int)L->d_in, (int)L->d_out);
        LAB_LAUNCHED();
    }
    return 0;
}

/* ---- the host reference ------------------------------------------------------- */

typedef struct ref_job {
    const lab *L;
    size_t t, T;
} ref_job;

/* ref[i] = X[chk[i]] W_e in double for i = t, t + T, ... */
static void *ref_rows(void *arg)
{
    const ref_job *j = (const ref_job *)arg;
    const lab *L = j->L;
    const size_t d_in = L->d_in, d_out = L->d_out;
    for (size_t i = j->t; i < L->n_chk; i += j->T) {
        const size_t r = L->chk[i];
        const float *x = L->hX + r * d_in;
        const float *w = L->hW + (size_t)L->rowexp[r] * d_in * d_out;
        double *acc = L->ref + i * d_out;
        for (size_t c = 0; c < d_out; c++)
            acc[c] = 0.0;
        for (size_t kk = 0; kk < d_in; kk++) {
            const double xv = (double)x[kk];
            const float *wr = w + kk * d_out;
            for (size_t c = 0; c < d_out; c++)
                acc[c] += xv * (double)wr[c];
        }
    }
    return NULL;
}

/* The checked rows and their reference, on all cores. */
static int host_reference(lab *L)
{
    const double per_row = 2.0 * (double)L->d_in * (double)L->d_out;
    size_t stride = 1;
    if ((double)L->B * per_row > CHECK_FLOPS)
        stride = (size_t)ceil((double)L->B * per_row / CHECK_FLOPS);
    L->n_chk = 0;
    for (size_t g = 0; g < L->G; g++) {
        size_t e = (size_t)L->gexp[g], q0 = L->off[e], q1 = q0 + L->cnt[e];
        for (size_t r = q0; r < q1; r++)
            if (r % stride == 0 || r == q0 || r == q1 - 1 || q1 - q0 < TINY_ROWS)
                L->chk[L->n_chk++] = r;
    }
    free(L->ref);
    size_t n;
    LAB_TRY(lab_mul(L->n_chk, L->d_out, &n), "reference size overflows");
    HOST_ALLOC(L->ref, n);
    long nc = sysconf(_SC_NPROCESSORS_ONLN);
    size_t T = nc < 1 ? 1 : nc > MAX_THREADS ? MAX_THREADS : (size_t)nc;
    pthread_t th[MAX_THREADS];
    bool started[MAX_THREADS] = {false};
    ref_job jobs[MAX_THREADS];
    for (size_t t = 0; t < T; t++) {
        jobs[t].L = L;
        jobs[t].t = t;
        jobs[t].T = T;
    }
    for (size_t t = 1; t < T; t++)
        started[t] = pthread_create(&th[t], NULL, ref_rows, &jobs[t]) == 0;
    ref_rows(&jobs[0]);
    for (size_t t = 1; t < T; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            ref_rows(&jobs[t]); /* a thread that did not start: its rows here */
    }
    return 0;
}

/* Runs fn once into a NaN-filled Y and compares the checked rows with the
 * reference: *nmse (NaN or infinite when rows were not written). */
static int check(lab *L, lab_fn fn, double *nmse)
{
    LAB_CUDA(cudaMemsetAsync(L->dY, 0xFF, L->B * L->d_out * sizeof(float), L->st));
    if (fn(L) != 0)
        return 1;
    LAB_CUDA(cudaStreamSynchronize(L->st));
    LAB_CUDA(cudaMemcpy(L->hY, L->dY, L->B * L->d_out * sizeof(float), cudaMemcpyDeviceToHost));
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < L->n_chk; i++) {
        const float *y = L->hY + L->chk[i] * L->d_out;
        const double *rf = L->ref + i * L->d_out;
        for (size_t c = 0; c < L->d_out; c++) {
            double d = (double)y[c] - rf[c];
            num += d * d;
            den += rf[c] * rf[c];
        }
    }
    *nmse = den == 0.0 ? (num == 0.0 ? 0.0 : INFINITY) : num / den;
    return 0;
}

/* ---- one distribution ----------------------------------------------------------- */

/* Groups, shape and pointer arrays of distribution dist, uploaded. */
static int setup_groups(lab *L, int dist)
{
    const size_t E = L->E;
    make_counts(dist, L->B, E, L->cnt);
    L->G = L->nbig = L->nt = L->max_rows = 0;
    size_t q = 0;
    for (size_t e = 0; e < E; e++) {
        L->off[e] = q;
        for (size_t i = 0; i < L->cnt[e]; i++)
            L->rowexp[q + i] = (int)e;
        q += L->cnt[e];
        if (L->cnt[e] == 0)
            continue;
        L->gexp[L->G++] = (int)e;
        if (L->cnt[e] > L->max_rows)
            L->max_rows = L->cnt[e];
        if (L->cnt[e] < TINY_ROWS)
            L->nt++;
        else
            L->nbig++;
    }
    L->off[E] = q;
    LAB_TRY(q == L->B, "distribution %s: %zu rows, not %zu", dist_names[dist], q, L->B);
    for (size_t g = 0; g < L->G; g++) {
        L->op[g] = CUBLAS_OP_N;
        L->m[g] = (int)L->d_out;
        L->k[g] = (int)L->d_in;
        L->lda[g] = (int)L->d_out;
        L->ldb[g] = (int)L->d_in;
        L->ldc[g] = (int)L->d_out;
        L->alpha[g] = 1.0f;
        L->beta[g] = 0.0f;
        L->gsize[g] = 1;
    }
    /* v1: every group; runs of G pointers W, X, Y. */
    for (size_t g = 0; g < L->G; g++) {
        size_t e = (size_t)L->gexp[g];
        L->n_all[g] = (int)L->cnt[e];
        L->hptr[g] = L->dW + e * L->d_in * L->d_out;
        L->hptr[L->G + g] = L->dX + L->off[e] * L->d_in;
        L->hptr[2 * L->G + g] = L->dY + L->off[e] * L->d_out;
    }
    LAB_CUDA(cudaMemcpy(L->dptr_all, L->hptr, 3 * L->G * sizeof(float *),
                        cudaMemcpyHostToDevice));
    /* v2: the big groups (runs of nbig), the tiny list. */
    size_t b = 0, t = 0;
    for (size_t g = 0; g < L->G; g++) {
        size_t e = (size_t)L->gexp[g];
        if (L->cnt[e] < TINY_ROWS) {
            L->htiny[3 * t] = (int)L->off[e];
            L->htiny[3 * t + 1] = (int)L->cnt[e];
            L->htiny[3 * t + 2] = (int)e;
            t++;
            continue;
        }
        L->n_big[b] = (int)L->cnt[e];
        L->hptr[b] = L->dW + e * L->d_in * L->d_out;
        L->hptr[L->nbig + b] = L->dX + L->off[e] * L->d_in;
        L->hptr[2 * L->nbig + b] = L->dY + L->off[e] * L->d_out;
        b++;
    }
    if (L->nbig > 0)
        LAB_CUDA(cudaMemcpy(L->dptr_big, L->hptr, 3 * L->nbig * sizeof(float *),
                            cudaMemcpyHostToDevice));
    if (L->nt > 0)
        LAB_CUDA(cudaMemcpy(L->dtiny, L->htiny, 3 * L->nt * sizeof(int),
                            cudaMemcpyHostToDevice));
    return 0;
}

static void print_line(const lab *L, const char *dist, const char *version, double flops,
                       double sec, double dense_sec, const double *nmse, bool ok)
{
    char dev[700], n0[32], n1[32], n2[32], n3[32];
    lab_json_escape(L->device, dev, sizeof dev);
    printf("{\"lab\":\"grouped_gemm\",\"version\":\"%s\",\"distribution\":\"%s\",\"B\":%zu,"
           "\"d_in\":%zu,\"d_out\":%zu,\"E\":%zu,\"groups\":%zu,\"tiny_groups\":%zu,"
           "\"max_rows\":%zu,\"flops\":%.0f,\"seconds\":%s,\"tflops\":%s,"
           "\"ratio_to_dense_sgemm\":%s,",
           version, dist, L->B, L->d_in, L->d_out, L->E, L->G, L->nt, L->max_rows, flops,
           lab_num(n0, sizeof n0, "%.6e", sec), lab_num(n1, sizeof n1, "%.4f", flops / sec * 1e-12),
           lab_num(n2, sizeof n2, "%.4f", dense_sec / sec));
    if (nmse != NULL)
        printf("\"nmse\":%s,\"checked_rows\":%zu,\"ok\":%s,",
               lab_num(n3, sizeof n3, "%.3e", *nmse), L->n_chk, ok ? "true" : "false");
    else
        printf("\"nmse\":null,\"checked_rows\":0,\"ok\":true,");
    printf("\"reps\":%d,\"device\":\"%s\"}\n", L->reps, dev);
    fflush(stdout);
}

/* Checks and times v0..v2 on distribution dist; *failed set by a failed check. */
static int run_dist(lab *L, int dist, double dense_sec, bool *failed)
{
    static const char *const names[] = {"v0_loop", "v1_grouped", "v2_tiny_grouped"};
    static const lab_fn fns[] = {run_v0, run_v1, run_v2};
    if (setup_groups(L, dist) != 0 || host_reference(L) != 0)
        return 1;
    const double flops = 2.0 * (double)L->B * (double)L->d_in * (double)L->d_out;
    for (int v = 0; v < 3; v++) {
        double nmse, sec;
        if (check(L, fns[v], &nmse) != 0)
            return 1;
        bool ok = nmse <= NMSE_TOL;
        if (!ok) {
            fprintf(stderr, "%s %s: nmse %.3e > %.1e over %zu checked rows\n", names[v],
                    dist_names[dist], nmse, NMSE_TOL, L->n_chk);
            *failed = true;
        }
        if (lab_time(fns[v], L, L->st, WARM, L->reps, L->ms, &sec) != 0)
            return 1;
        print_line(L, dist_names[dist], names[v], flops, sec, dense_sec, &nmse, ok);
    }
    return 0;
}

static int run(lab *L, int first, int last)
{
    const size_t B = L->B, d_in = L->d_in, d_out = L->d_out, E = L->E;
    size_t nx, ny, nw;
    LAB_TRY(lab_mul(B, d_in, &nx) && lab_mul(B, d_out, &ny) && lab_mul(d_in, d_out, &nw) &&
                lab_mul(nw, E, &nw) && lab_mul(nw, sizeof(float), &nw) &&
                lab_mul(nx, sizeof(float), &nx) && lab_mul(ny, sizeof(float), &ny),
            "sizes overflow");
    LAB_CUDA(cudaStreamCreateWithFlags(&L->st, cudaStreamNonBlocking));
    L->have_st = true;
    LAB_CUBLAS(cublasCreate(&L->cb));
    L->have_cb = true;
    LAB_CUBLAS(cublasSetStream(L->cb, L->st));
    LAB_CUBLAS(cublasSetMathMode(L->cb, CUBLAS_DEFAULT_MATH)); /* FP32, no TF32 */
    LAB_CUDA(cudaMalloc((void **)&L->dX, nx));
    LAB_CUDA(cudaMalloc((void **)&L->dY, ny));
    LAB_CUDA(cudaMalloc((void **)&L->dW, nw));
    LAB_CUDA(cudaMalloc((void **)&L->dptr_all, 3 * E * sizeof(float *)));
    LAB_CUDA(cudaMalloc((void **)&L->dptr_big, 3 * E * sizeof(float *)));
    LAB_CUDA(cudaMalloc((void **)&L->dtiny, 3 * E * sizeof(int)));
    HOST_ALLOC(L->hX, nx / sizeof(float));
    HOST_ALLOC(L->hY, ny / sizeof(float));
    HOST_ALLOC(L->hW, nw / sizeof(float));
    HOST_ALLOC(L->ms, (size_t)L->reps);
    HOST_ALLOC(L->cnt, E);
    HOST_ALLOC(L->off, E + 1);
    HOST_ALLOC(L->rowexp, B);
    HOST_ALLOC(L->gexp, E);
    HOST_ALLOC(L->op, E);
    int **ints[] = {&L->m, &L->n_all, &L->n_big, &L->k, &L->lda, &L->ldb, &L->ldc, &L->gsize};
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++)
        HOST_ALLOC(*ints[i], E);
    HOST_ALLOC(L->alpha, E);
    HOST_ALLOC(L->beta, E);
    HOST_ALLOC(L->hptr, 3 * E);
    HOST_ALLOC(L->htiny, 3 * E);
    HOST_ALLOC(L->chk, B);
    uint64_t seed = 0x6363725F6C6162ull; /* "ccr_lab" */
    for (size_t i = 0; i < nx / sizeof(float); i++)
        L->hX[i] = lab_uniform(&seed, -1.0f, 1.0f);
    for (size_t i = 0; i < nw / sizeof(float); i++)
        L->hW[i] = lab_uniform(&seed, -1.0f, 1.0f);
    LAB_CUDA(cudaMemcpy(L->dX, L->hX, nx, cudaMemcpyHostToDevice));
    LAB_CUDA(cudaMemcpy(L->dW, L->hW, nw, cudaMemcpyHostToDevice));

    /* The dense sgemm of the same FLOPs, the yardstick of every line: one
     * group of B rows, not checked (cuBLAS itself). */
    double dense_sec;
    if (lab_time(run_dense, L, L->st, WARM, L->reps, L->ms, &dense_sec) != 0)
        return 1;
    L->G = 1;
    L->max_rows = B;
    print_line(L, "dense", "dense_sgemm", 2.0 * (double)B * (double)d_in * (double)d_out,
               dense_sec, dense_sec, NULL, true);
    bool failed = false;
    for (int dist = first; dist <= last; dist++)
        if (run_dist(L, dist, dense_sec, &failed) != 0)
            return 1;
    return failed ? 1 : 0;
}

int main(int argc, char **argv)
{
    lab L;
    memset(&L, 0, sizeof L);
    int first = -1, last = -1;
    if (argc == 6 || argc == 7) {
        L.B = lab_parse_size(argv[1], INT_MAX);
        L.d_in = lab_parse_size(argv[2], INT_MAX);
        L.d_out = lab_parse_size(argv[3], (size_t)1 << 24); /* grid.y of the tiny kernel */
        L.E = lab_parse_size(argv[4], INT_MAX / 3);
        L.reps = argc == 7 ? (int)lab_parse_size(argv[6], 100000) : 20;
        for (int d = 0; d < N_DIST; d++)
            if (strcmp(argv[5], dist_names[d]) == 0)
                first = last = d;
        if (strcmp(argv[5], "skewed") == 0)
            first = last = D_ZIPF;
        if (strcmp(argv[5], "all") == 0) {
            first = 0;
            last = N_DIST - 1;
        }
    }
    if (L.B == 0 || L.d_in == 0 || L.d_out == 0 || L.E == 0 || L.reps == 0 || first < 0) {
        fprintf(stderr, "usage: %s B D_IN D_OUT E uniform|zipf|skewed|one|tiny|all [REPS]\n"
                        "  B rows (routed pairs), E experts; B, D_IN < 2^31, D_OUT <= 2^24\n",
                argv[0]);
        return 2;
    }
    int rc = lab_device(L.device, sizeof L.device);
    if (rc == 0)
        rc = run(&L, first, last);
    lab_free(&L);
    return rc;
}
