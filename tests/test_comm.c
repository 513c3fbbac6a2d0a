/*
 * test_comm.c - communicators (ccr_comm.h).
 *
 * Run plainly it checks the self communicator and the error paths.  Run
 * under mpirun (tests/mpi_run.sh: meson tests comm_mpi_np1 .. np4) it also
 * checks the MPI communicator on every rank: an all-to-all-v of uneven
 * counts (zeros, a rank sending nothing, a rank receiving nothing) whose
 * every value names its sender, receiver and index; all-reduces whose
 * results are the exact sums (integers in float and double) and the same
 * bits on every rank (random floats, more than one chunk of a size); the
 * byte counts of the statistics; and a timeout: rank 0 waits alone at a
 * barrier and gets CCR_ECOMM, then every later call fails at once.
 * Under mpirun each rank runs the suite; any failing rank fails the job.
 * With CCR_TEST_COMM_NCCL=1 it adds the NCCL communicator on device memory
 * (exit 77 without a GPU or without NCCL).  With CCR_TEST_COMM_FAIL_RANK=r, rank r exits at once with status 3
 * (tests/mpi_fail.sh: the job must end with an error, not hang).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ccr_config.h"  // provides: CCR_HAVE_MPI
#include "ccr_test.h"
#if CCR_HAVE_MPI
#include <mpi.h>
#endif

static ccr_ctx *ctx;
static ccr_comm *comm;  /* MPI under mpirun, else NULL */

START_TEST(test_self)
{
    ccr_comm *c;
    CCR_CK_OK(ctx, ccr_comm_self_init(ctx, &c));
    ck_assert_int_eq(ccr_comm_rank(c), 0);
    ck_assert_int_eq(ccr_comm_size(c), 1);
    ck_assert_str_eq(ccr_comm_name(c), "self");
    float send[5] = {1, 2, 3, 4, 5}, recv[5] = {0};
    size_t sc[1] = {3}, sd[1] = {2}, rc[1] = {3}, rd[1] = {1};
    CCR_CK_OK(ctx, ccr_comm_alltoallv(c, send, sc, sd, recv, rc, rd));
    ck_assert(recv[0] == 0 && recv[1] == 3 && recv[2] == 4 && recv[3] == 5 && recv[4] == 0);
    size_t cs = 7, cr = 0;
    CCR_CK_OK(ctx, ccr_comm_alltoall_counts(c, &cs, &cr));
    ck_assert_uint_eq(cr, 7);
    double d[2] = {1.5, -2};
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum_f64(c, d, 2));
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum(c, send, 5));
    ck_assert(d[0] == 1.5 && d[1] == -2 && send[4] == 5);
    CCR_CK_OK(ctx, ccr_comm_barrier(c));
    ccr_comm_stats st;
    CCR_CK_OK(ctx, ccr_comm_stats_get(c, &st));
    ck_assert(st.alltoall_bytes == 0 && st.allreduce_bytes == 0 && st.calls == 4);
    ccr_comm_stats_reset(c);
    CCR_CK_OK(ctx, ccr_comm_stats_get(c, &st));
    ck_assert_uint_eq(st.calls, 0);

    /* Errors: mismatched self counts, counts beyond int, NULL buffers. */
    rc[0] = 2;
    CCR_CK_STATUS(ctx, ccr_comm_alltoallv(c, send, sc, sd, recv, rc, rd), CCR_EBADLEN);
    size_t big[1] = {(size_t)1 << 31};
    CCR_CK_STATUS(ctx, ccr_comm_alltoallv(c, send, big, sd, recv, big, rd), CCR_EUNSUP);
    rc[0] = 3;
    CCR_CK_STATUS(ctx, ccr_comm_alltoallv(c, NULL, sc, sd, recv, rc, rd), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_comm_alltoallv(c, send, NULL, sd, recv, rc, rd), CCR_EINVAL);
    size_t zero[1] = {0};
    CCR_CK_OK(ctx, ccr_comm_alltoallv(c, NULL, zero, zero, NULL, zero, zero));
    CCR_CK_STATUS(ctx, ccr_comm_allreduce_sum(c, NULL, 3), CCR_EINVAL);
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum(c, NULL, 0));
    CCR_CK_STATUS(ctx, ccr_comm_set_timeout(c, 0.0), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_comm_set_timeout(c, NAN), CCR_EINVAL);
    CCR_CK_OK(ctx, ccr_comm_set_timeout(c, 5.0));
    ccr_comm_free(c);
}
END_TEST

/* The engines that are not there (or not usable here) say so. */
START_TEST(test_engines_absent)
{
    ccr_comm *c = NULL;
#if !CCR_HAVE_MPI
    CCR_CK_STATUS(ctx, ccr_comm_mpi_init(ctx, &c), CCR_EUNSUP);
#endif
    ccr_backend *cpu;
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &cpu));
    CCR_CK_STATUS(ctx, ccr_comm_nccl_init(ctx, cpu, &c), CCR_EUNSUP);
    ck_assert_ptr_null(c);
    ccr_backend_free(cpu);
}
END_TEST

#if CCR_HAVE_MPI
/* Floats sent from rank s to rank d: (s + 2 d + rank-independent twist) % 5
 * of them, so counts are uneven and some are 0; rank 1 (when there is one)
 * sends nothing at all and the last rank receives nothing from rank 0. */
static size_t count_of(int s, int d, int P)
{
    if (P > 1 && s == 1)
        return 0;
    if (P > 2 && s == 0 && d == P - 1)
        return 0;
    return (size_t)((s + 2 * d + 3) % 5);
}

static float value_of(int s, int d, size_t i) { return (float)(s * 10000 + d * 100 + (int)i); }

START_TEST(test_alltoallv)
{
    const int P = ccr_comm_size(comm), r = ccr_comm_rank(comm);
    size_t *sc = calloc(4 * (size_t)P, sizeof *sc), *sd = sc + P, *rc = sd + P, *rd = rc + P;
    size_t ns = 0, nr = 0;
    for (int p = 0; p < P; p++)
        sc[p] = count_of(r, p, P), sd[p] = ns + 1, ns += sc[p] + 1;  /* a gap float */
    CCR_CK_OK(ctx, ccr_comm_alltoall_counts(comm, sc, rc));
    for (int p = 0; p < P; p++) {
        ck_assert_uint_eq(rc[p], count_of(p, r, P));
        rd[p] = nr, nr += rc[p];
    }
    float *send = malloc((ns + 1) * sizeof *send), *recv = malloc((nr + 1) * sizeof *recv);
    for (size_t i = 0; i <= ns; i++)
        send[i] = -1.0f;
    for (int p = 0; p < P; p++)
        for (size_t i = 0; i < sc[p]; i++)
            send[sd[p] + i] = value_of(r, p, i);
    recv[nr] = 42.0f;
    CCR_CK_OK(ctx, ccr_comm_alltoallv(comm, send, sc, sd, recv, rc, rd));
    for (int p = 0; p < P; p++)
        for (size_t i = 0; i < rc[p]; i++)
            ck_assert_msg(recv[rd[p] + i] == value_of(p, r, i), "rank %d from %d [%zu]: %g", r,
                          p, i, (double)recv[rd[p] + i]);
    ck_assert(recv[nr] == 42.0f);  /* nothing written past the counts */
    free(send), free(recv), free(sc);
}
END_TEST

/* Exact sums (integers) on every rank, and random floats whose sums hold
 * the same bits on every rank (checked against rank 0's by MPI itself). */
START_TEST(test_allreduce)
{
    const int P = ccr_comm_size(comm), r = ccr_comm_rank(comm);
    const size_t n = 300007;
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y), *y0 = malloc(n * sizeof *y0);
    double *d = malloc(n * sizeof *d);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)((r + 1) * (int)(i % 1000)), d[i] = (double)(r + 1) * (double)i;
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum(comm, x, n));
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum_f64(comm, d, n));
    const double tri = (double)P * (P + 1) / 2;
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(x[i] == (float)(tri * (double)(i % 1000)), "x[%zu] = %g", i, (double)x[i]);
        ck_assert_msg(d[i] == tri * (double)i, "d[%zu] = %g", i, d[i]);
    }
    gsl_rng *g = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(g, 1000 + (unsigned long)r);
    ccr_test_fill_uniform(g, y, n, -1e3f, 1e3f);
    gsl_rng_free(g);
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum(comm, y, n));
    memcpy(y0, y, n * sizeof *y);
    MPI_Bcast(y0, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
    ck_assert_msg(memcmp(y, y0, n * sizeof *y) == 0, "rank %d: sum differs from rank 0's", r);
    free(x), free(y), free(y0), free(d);
}
END_TEST

/* Statistics: the floats sent to other ranks, 2 (P-1)/P n per all-reduce. */
START_TEST(test_stats)
{
    const int P = ccr_comm_size(comm), r = ccr_comm_rank(comm);
    ccr_comm_stats_reset(comm);
    size_t *sc = calloc(4 * (size_t)P, sizeof *sc), *sd = sc + P, *rc = sd + P, *rd = rc + P;
    size_t ns = 0, nr = 0, others = 0;
    for (int p = 0; p < P; p++) {
        sc[p] = (size_t)(p + 1), sd[p] = ns, ns += sc[p];
        others += p != r ? sc[p] : 0;
        rc[p] = (size_t)(r + 1), rd[p] = nr, nr += rc[p];
    }
    float *send = calloc(ns, sizeof *send), *recv = calloc(nr, sizeof *recv);
    CCR_CK_OK(ctx, ccr_comm_alltoallv(comm, send, sc, sd, recv, rc, rd));
    float v[10] = {0};
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum(comm, v, 10));
    ccr_comm_stats st;
    CCR_CK_OK(ctx, ccr_comm_stats_get(comm, &st));
    ck_assert(st.alltoall_bytes == 4.0 * (double)others);
    ck_assert(fabs(st.allreduce_bytes - 2.0 * (P - 1) / P * 40.0) < 1e-9);
    ck_assert_uint_eq(st.calls, 2);
    ck_assert(st.alltoall_seconds >= 0 && st.allreduce_seconds >= 0);
    free(send), free(recv), free(sc);
}
END_TEST

/* Rank 0 alone at a barrier (the others arrive after its timeout): it gets
 * CCR_ECOMM, and every later call on that communicator fails at once.  The
 * others' barrier completes when they arrive; rank 0 waits for them before
 * freeing, so that nothing is left pending at MPI_Finalize. */
START_TEST(test_timeout)
{
    const int P = ccr_comm_size(comm), r = ccr_comm_rank(comm);
    if (P < 2)
        return;
    ccr_comm *c;
    CCR_CK_OK(ctx, ccr_comm_mpi_init(ctx, &c));
    struct timespec late = {1, 0};
    if (r == 0) {
        CCR_CK_OK(ctx, ccr_comm_set_timeout(c, 0.2));
        CCR_CK_STATUS(ctx, ccr_comm_barrier(c), CCR_ECOMM);
        ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "no answer"));
        float x = 1;
        CCR_CK_STATUS(ctx, ccr_comm_allreduce_sum(c, &x, 1), CCR_ECOMM);
        CCR_CK_OK(ctx, ccr_comm_set_timeout(c, 30.0));  /* for the pending barrier at free */
    } else {
        nanosleep(&late, NULL);
        CCR_CK_OK(ctx, ccr_comm_barrier(c));
    }
    ccr_comm_free(c);
    CCR_CK_OK(ctx, ccr_comm_barrier(comm));
}
END_TEST

/* NCCL (CCR_TEST_COMM_NCCL=1, one GPU per rank): the same all-to-all-v and
 * exact sums on device memory. */
static ccr_backend *gpu;
static ccr_comm *ncomm;

START_TEST(test_nccl)
{
    const int P = ccr_comm_size(ncomm), r = ccr_comm_rank(ncomm);
    ck_assert_str_eq(ccr_comm_name(ncomm), "nccl");
    size_t *sc = calloc(4 * (size_t)P, sizeof *sc), *sd = sc + P, *rc = sd + P, *rd = rc + P;
    size_t ns = 0, nr = 0;
    for (int p = 0; p < P; p++)
        sc[p] = count_of(r, p, P) + 3, sd[p] = ns, ns += sc[p];
    CCR_CK_OK(ctx, ccr_comm_alltoall_counts(ncomm, sc, rc));
    for (int p = 0; p < P; p++)
        rd[p] = nr, nr += rc[p];
    float *send = malloc(ns * sizeof *send), *recv = malloc(nr * sizeof *recv), *ds, *dr;
    for (int p = 0; p < P; p++)
        for (size_t i = 0; i < sc[p]; i++)
            send[sd[p] + i] = value_of(r, p, i);
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, ns * sizeof *send, (void **)&ds));
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, nr * sizeof *recv, (void **)&dr));
    CCR_CK_OK(ctx, ccr_backend_set(gpu, ds, send, ns * sizeof *send));
    CCR_CK_OK(ctx, ccr_comm_alltoallv(ncomm, ds, sc, sd, dr, rc, rd));
    CCR_CK_OK(ctx, ccr_backend_get(gpu, recv, dr, nr * sizeof *recv));
    for (int p = 0; p < P; p++)
        for (size_t i = 0; i < rc[p]; i++)
            ck_assert(recv[rd[p] + i] == value_of(p, r, i));
    for (size_t i = 0; i < ns; i++)
        send[i] = (float)((r + 1) * (int)(i % 100));
    CCR_CK_OK(ctx, ccr_backend_set(gpu, ds, send, ns * sizeof *send));
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum(ncomm, ds, ns < 64 ? ns : 64));
    CCR_CK_OK(ctx, ccr_backend_get(gpu, send, ds, ns * sizeof *send));
    for (size_t i = 0; i < (ns < 64 ? ns : 64); i++)
        ck_assert(send[i] == (float)((double)P * (P + 1) / 2 * (double)(i % 100)));
    ccr_backend_free_buffer(gpu, ds);
    ccr_backend_free_buffer(gpu, dr);
    free(send), free(recv), free(sc);
}
END_TEST
#endif

int main(int argc, char **argv)
{
    (void)argc, (void)argv;
    bool under_mpirun = getenv("OMPI_COMM_WORLD_SIZE") != NULL;
#if CCR_HAVE_MPI
    if (under_mpirun && MPI_Init(&argc, &argv) != MPI_SUCCESS)
        return 1;
#else
    if (under_mpirun) {
        printf("test_comm: skipped: built without MPI\n");
        return 77;
    }
#endif
    if (ccr_ctx_init(&ctx) != CCR_OK)
        return 1;
    Suite *su = suite_create("comm");
    TCase *tc = tcase_create("comm");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_self);
    tcase_add_test(tc, test_engines_absent);
#if CCR_HAVE_MPI
    if (under_mpirun) {
        if (ccr_comm_mpi_init(ctx, &comm) != CCR_OK) {
            fprintf(stderr, "test_comm: %s\n", ccr_ctx_errmsg(ctx));
            return 1;
        }
        ccr_comm_set_timeout(comm, 60.0);
        printf("test_comm: rank %d of %d\n", ccr_comm_rank(comm), ccr_comm_size(comm));
        /* tests/mpi_fail.sh: this rank fails at once; the job must end. */
        const char *fail = getenv("CCR_TEST_COMM_FAIL_RANK");
        if (fail != NULL && atoi(fail) == ccr_comm_rank(comm)) {
            fprintf(stderr, "test_comm: rank %s exits with status 3 on purpose\n", fail);
            exit(3);
        }
        tcase_add_test(tc, test_alltoallv);
        tcase_add_test(tc, test_allreduce);
        tcase_add_test(tc, test_stats);
        tcase_add_test(tc, test_timeout);
        if (getenv("CCR_TEST_COMM_NCCL") != NULL) {
            if (ccr_backend_cuda_init(ctx, 0, &gpu) != CCR_OK ||
                ccr_comm_nccl_init(ctx, gpu, &ncomm) != CCR_OK) {
                printf("test_comm: NCCL skipped: %s\n", ccr_ctx_errmsg(ctx));
                ccr_backend_free(gpu);
                ccr_comm_free(comm);
                MPI_Finalize();
                return 77;
            }
            tcase_add_test(tc, test_nccl);
        }
    }
#endif
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_set_fork_status(sr, CK_NOFORK);  /* no fork under MPI */
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
#if CCR_HAVE_MPI
    ccr_comm_free(ncomm);
    ccr_backend_free(gpu);
#endif
    ccr_comm_free(comm);
#if CCR_HAVE_MPI
    if (under_mpirun)
        MPI_Finalize();
#endif
    ccr_ctx_free(ctx);
    return failed == 0 ? 0 : 1;
}
