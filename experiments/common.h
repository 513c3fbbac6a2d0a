/*
 * common.h - helpers shared by the experiment drivers (not part of libccr).
 *
 * Command-line parsing with one-line errors and exit code 2, a monotonic
 * timer, a progress line on stderr, and the fields every JSONL record carries
 * (driver, git revision, machine, OpenBLAS core, seed), and the startup,
 * argument-loop, output and teardown steps every driver repeats.
 */
#ifndef CCR_DRV_COMMON_H
#define CCR_DRV_COMMON_H

#include <gsl/gsl_rng.h>
#include <stdbool.h>
#include <stddef.h>

#include "ccr/ccr.h"

/* Prints "PROG: message" and exits with status 2 (bad usage). */
void drv_usage_error(const char *prog, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));

/* Prints "PROG: what: ctx message" and exits with status 1 (run failure). */
void drv_fail(const char *prog, ccr_ctx *ctx, ccr_status s, const char *what)
    __attribute__((noreturn));

/* An input (data set, corpus) that cannot be loaded: prints "PROG:
 * message: ctx message" and exits 1 if s is CCR_ENOMEM or CCR_EDEVMEM
 * (the machine's memory, a runtime failure), else 2 (a missing, unreadable
 * or malformed input: a usage error).  docs/DESIGN.md, "Exit codes". */
void drv_input_error(const char *prog, ccr_ctx *ctx, ccr_status s, const char *fmt, ...)
    __attribute__((format(printf, 4, 5), noreturn));

/* Option values.  The drv_scan_* functions never exit: they return false
 * (or DRV_OPT_BAD) with a one-line message in e->msg naming the flag, so
 * that tests and the option fuzzer can call them.  The drv_parse_* wrappers
 * exit 2 with that message.  Accepted grammar (docs/DESIGN.md, "Driver
 * options"):
 *   size    [0-9]+, at most SIZE_MAX; no space, sign, "0x" or exponent
 *   seed    a size in [1, DRV_SEED_MAX] (GSL's MT19937 keeps 32 bits and
 *           maps 0 to 4357, so other values would alias)
 *   double  [-]D[.D][e[+-]D] or [-].D[e[+-]D] with D = [0-9]+, finite,
 *           in [min, max]; no '-' when min >= 0; no space, '+', "inf",
 *           "nan" or hex
 *   list    comma-separated items, none empty, at most cap of them */
#define DRV_SEED_MAX 4294967295UL
#define DRV_LIST_MAX 64

typedef struct drv_err {
    char msg[256];
} drv_err;

/* One item of a comma-separated list: len bytes at p (not terminated). */
typedef struct drv_span {
    const char *p;
    size_t len;
} drv_span;

bool drv_scan_size(const char *flag, const char *v, size_t min, size_t *out, drv_err *e);
bool drv_scan_seed(const char *flag, const char *v, unsigned long *out, drv_err *e);
bool drv_scan_double(const char *flag, const char *v, double min, double max, double *out,
                     drv_err *e);
/* Splits v at commas into items[0..*n), *n <= cap. */
bool drv_scan_list(const char *flag, const char *v, drv_span *items, size_t cap, size_t *n,
                   drv_err *e);
/* A list of sizes >= min into out[0..*n), *n <= min(cap, DRV_LIST_MAX). */
bool drv_scan_size_list(const char *flag, const char *v, size_t min, size_t *out, size_t cap,
                        size_t *n, drv_err *e);
/* True when the item is exactly name. */
bool drv_span_is(drv_span s, const char *name);

/* Parse a flag's value or exit 2 naming the flag. */
size_t drv_parse_size(const char *prog, const char *flag, const char *v, size_t min);
double drv_parse_double(const char *prog, const char *flag, const char *v, double min,
                        double max);
unsigned long drv_parse_seed(const char *prog, const char *flag, const char *v);

/* Parses "512,256" into out (at most cap values, each >= 1); returns count. */
size_t drv_parse_size_list(const char *prog, const char *flag, const char *v, size_t *out,
                           size_t cap);
/* drv_scan_list or exit 2; returns the count. */
size_t drv_parse_list(const char *prog, const char *flag, const char *v, drv_span *items,
                      size_t cap);

/* The arguments every driver reads alike: --help or -h prints usage() and
 * exits 0; an argument not starting with "--" exits 2 ("unexpected
 * argument").  Returns true for --quick, false for any other option. */
bool drv_parse_common(const char *prog, const char *a, void (*usage)(void));

/* True when --quick is among the arguments.  Drivers look before parsing so
 * that --quick only changes defaults: any option given explicitly wins,
 * wherever it stands relative to --quick. */
bool drv_quick_requested(int argc, char **argv);

/* The last branch of an option chain: exits 2 with "A needs a value" when v
 * is NULL, "unknown option 'A'" otherwise. */
void drv_bad_option(const char *prog, const char *a, const char *v)
    __attribute__((noreturn));

/* Under an MPI launcher (mpirun sets OMPI_COMM_WORLD_RANK): this process's
 * rank and the number of processes, from the environment, before any MPI
 * call (0 and 1 otherwise). */
int drv_launcher_rank(void);
int drv_launcher_size(void);

/* Under an MPI launcher with more than one process: MPI_Init and the MPI
 * communicator (exit 1 naming "MPI" when MPI cannot start, exit 2 in a
 * build without MPI); NULL otherwise (one process, nothing started).
 * drv_comm_end frees it and finalizes MPI. */
ccr_comm *drv_comm_start(const char *prog, ccr_ctx *ctx);

/* For the drivers that run in one process only: under an MPI launcher with
 * more than one process, exit 2 saying so (before any output exists). */
void drv_one_process(const char *prog);
void drv_comm_end(ccr_comm *comm);

/* --backend cpu|cuda: when a is "--backend", sets *cuda from v (anything
 * else exits 2) and returns true (the caller skips v); false otherwise. */
bool drv_parse_backend(const char *prog, const char *a, const char *v, bool *cuda);

/* Startup: GSL's abort-on-error handler off, a context (exit 1 without one),
 * CUDA device 0 when cuda, else the CPU backend (exit 1 naming "backend"),
 * and, when rng is not NULL, an MT19937 generator seeded with seed (exit 1
 * without one). */
void drv_setup(const char *prog, bool cuda, unsigned long seed, ccr_ctx **ctx,
               ccr_backend **be, gsl_rng **rng);

/* n floats of backend memory (device memory on CUDA, host memory on the
 * CPU backend), filled from host when host is not NULL (zeros otherwise);
 * exit 1 naming "buffers" on failure.  Free with ccr_backend_free_buffer. */
float *drv_backend_floats(const char *prog, ccr_ctx *ctx, ccr_backend *be, size_t n,
                          const float *host);

/* A fresh MT19937 generator seeded with seed (exit 1 naming "rng"). */
gsl_rng *drv_rng(const char *prog, ccr_ctx *ctx, unsigned long seed);

/* The results record, and the JSONL file when path is not NULL (*out is NULL
 * otherwise).  Call it once every argument is validated: a file that cannot
 * be opened is a usage error (exit 2). */
void drv_open_out(const char *prog, ccr_ctx *ctx, const char *path, ccr_record **rec,
                  ccr_jsonl **out);

/* Ends a record whose fields were added with final status s: exit 1 naming
 * "record" if s failed, else writes it to out when out is not NULL (exit 1
 * naming "write results"). */
void drv_write_record(const char *prog, ccr_ctx *ctx, ccr_status s, ccr_jsonl *out,
                      const ccr_record *rec);

/* Teardown: closes out (exit 1 naming "close results"), then frees rec, rng,
 * be and ctx; any of them may be NULL. */
void drv_teardown(const char *prog, ccr_ctx *ctx, ccr_backend *be, gsl_rng *rng,
                  ccr_jsonl *out, ccr_record *rec);

/* Seconds from a monotonic clock. */
double drv_now(void);

/* The median of v[0..n) (sorts v in place); NaN for n == 0. */
double drv_median(double *v, size_t n);

/* The 1-minute load average (other processes share the cores), or NaN. */
double drv_load_avg(void);

/* One progress line on stderr, rewritten in place ("\r"), with rate and ETA. */
void drv_progress(const char *label, size_t done, size_t total, double t_start,
                  const char *extra);
/* Ends the progress line. */
void drv_progress_end(void);

/* The CPU model from /proc/cpuinfo and the host's core count, e.g.
 * "AMD EPYC 9B45 (2 cores)". */
const char *drv_machine(void);

/* Adds driver, version, git, machine, blas_core, blas_threads, backend and
 * seed fields to a record. */
ccr_status drv_record_base(ccr_record *r, const char *driver, const ccr_backend *be,
                           unsigned long seed);

/* Gate and bank options shared by the drivers (--gate --experts --k
 * --groups --k-groups --k2 --depth --combine --bits-from --grad-mode
 * --capacity-factor --eval-capacity-factor --w-importance --w-load
 * --aux-alpha --z-loss --noise-eps --randomize --bank --expert-hidden).  If
 * `flag` is one of them, parses `value` into cfg (exiting 2 on a bad value
 * or an unknown gate name, listing the valid ones), remembers that the flag
 * was given, sets *used_value when the flag took the value, and returns
 * true. */
bool drv_parse_gate_option(const char *prog, const char *flag, const char *value,
                           ccr_cond_config *cfg, bool *used_value);

/* The same without exiting: DRV_OPT_NONE when flag is not a gate option,
 * DRV_OPT_OK when parsed, DRV_OPT_BAD with e->msg on a bad value. */
typedef enum drv_opt { DRV_OPT_NONE, DRV_OPT_OK, DRV_OPT_BAD } drv_opt;
drv_opt drv_scan_gate_option(const char *flag, const char *value, ccr_cond_config *cfg,
                             bool *used_value, drv_err *e);

/* ccr_cond_config_default(): the drivers' defaults are the library's (one
 * place, src/gate.c and src/cond.c).  Also forgets which gate options were
 * given: call it before parsing. */
ccr_cond_config drv_gate_defaults(void);

/* Usage lines for those options. */
extern const char drv_gate_usage[];

/* After parsing, when a gate was chosen: resolves the bank (the gate's own
 * unless --bank was given: linear for signtree, FFN otherwise) and exits 2
 * naming the flag if an option given explicitly is one the gate does not
 * use (ccr_gate_type_uses), or --expert-hidden with a linear bank. */
void drv_gate_finish(const char *prog, ccr_cond_config *cfg, bool bank_set);

/* For drivers whose gates are fixed by other options (ccr-lm's models):
 * exits 2 with "FLAG: why" for a gate option given explicitly whose
 * ccr_gate_option bit is not in `uses`. */
void drv_gate_refuse_given(const char *prog, unsigned uses, const char *why);

/* The first gate option flag given explicitly since drv_gate_defaults, or
 * NULL (for drivers that need --gate before any gate option). */
const char *drv_gate_option_given(void);

/* Adds the gate configuration to a record under the flag names: every
 * option (k_groups and eval_capacity_factor included), also those the gate
 * does not use, which hold the defaults and do not affect the run. */
ccr_status drv_record_gate(ccr_record *r, const ccr_cond_config *cfg);

#endif /* CCR_DRV_COMMON_H */
