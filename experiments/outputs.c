/*
 * outputs.c - output-path checks, stale temporaries, and keeping a failed
 * run's results under "<out>.partial" (outputs.h).
 */
#define _POSIX_C_SOURCE 200809L
#include "outputs.h"

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"   // provides: drv_usage_error
#include "tmpfile.h"  // provides: ccr_tmp_create, ccr_tmp_release, ccr_tmp_sweep

enum { MAX_PATHS = 16, MAX_WATCH = 4, WATCH_PATH = 4096 };

typedef struct {
    const char *flag, *path;
    bool out;
    bool exists;         /* stat succeeded */
    struct stat st;      /* the file (exists) or its directory (!exists) */
    const char *base;    /* last path component (for !exists) */
} io_path;

static io_path paths[MAX_PATHS];
static size_t n_paths;

typedef struct {
    ccr_jsonl *w;                 /* NULL: free slot */
    volatile sig_atomic_t armed;  /* the signal handler may rename */
    char tmp[WATCH_PATH], partial[WATCH_PATH];
} watch;

static watch watches[MAX_WATCH];
static const char *watch_prog = "ccr";

static void add(const char *flag, const char *path, bool out)
{
    if (path == NULL || n_paths == MAX_PATHS)
        return;
    paths[n_paths++] = (io_path){.flag = flag, .path = path, .out = out};
}

void drv_io_input(const char *flag, const char *path)
{
    if (path != NULL && access(path, F_OK) == 0)
        add(flag, path, false);
}

void drv_io_input_fmnist(const char *flag, const char *dir)
{
    static const char *names[] = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"};
    static char buf[2 * 4][1100];
    if (dir == NULL)
        return;
    for (size_t i = 0; i < 8; i++) {
        snprintf(buf[i], sizeof buf[i], "%s/%s%s", dir, names[i / 2], i % 2 ? ".gz" : "");
        drv_io_input(flag, buf[i]);
    }
}

void drv_io_output(const char *flag, const char *path)
{
    add(flag, path, true);
}

/* Fills p's identity: the file, or for a missing output its directory. */
static void identify(const char *prog, io_path *p)
{
    p->exists = stat(p->path, &p->st) == 0;
    if (p->exists || !p->out)
        return;
    const char *slash = strrchr(p->path, '/');
    p->base = slash ? slash + 1 : p->path;
    char dir[4096];
    if (slash == NULL)
        snprintf(dir, sizeof dir, ".");
    else if (slash == p->path)
        snprintf(dir, sizeof dir, "/");
    else
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - p->path), p->path);
    if (p->base[0] == '\0')
        drv_usage_error(prog, "%s %s names a directory, not a file", p->flag, p->path);
    if (stat(dir, &p->st) != 0)
        drv_usage_error(prog, "%s %s: cannot use the directory '%s': %s", p->flag, p->path, dir,
                        strerror(errno));
    if (!S_ISDIR(p->st.st_mode))
        drv_usage_error(prog, "%s %s: '%s' is not a directory", p->flag, p->path, dir);
}

/* An output written in place (a device, a FIFO): never renamed over. */
static bool is_stream(const io_path *p)
{
    return p->exists && !S_ISREG(p->st.st_mode) && !S_ISDIR(p->st.st_mode);
}

static bool same_file(const io_path *a, const io_path *b)
{
    if (is_stream(a) || is_stream(b))
        return false;
    if (a->exists != b->exists)
        return false;
    bool same_node = a->st.st_dev == b->st.st_dev && a->st.st_ino == b->st.st_ino;
    return a->exists ? same_node : same_node && strcmp(a->base, b->base) == 0;
}

/* A killed run's results, kept by the sweep (ccr_tmp_sweep). */
static void said_kept(void *prog, const char *dir, const char *tmp, const char *partial)
{
    fprintf(stderr, "%s: the complete lines of a killed run's results (%s) are in %s/%s\n",
            (const char *)prog, tmp, dir, partial);
}

void drv_io_check(const char *prog)
{
    for (size_t i = 0; i < n_paths; i++) {
        identify(prog, &paths[i]);
        if (paths[i].out && paths[i].exists && S_ISDIR(paths[i].st.st_mode))
            drv_usage_error(prog, "%s %s is a directory", paths[i].flag, paths[i].path);
    }
    for (size_t i = 0; i < n_paths; i++)
        for (size_t j = i + 1; j < n_paths; j++) {
            const io_path *a = &paths[i], *b = &paths[j];
            if ((a->out || b->out) && same_file(a, b)) {
                if (!a->out)   /* name the input first */
                    drv_usage_error(prog, "%s %s is the same file as the input %s %s; refusing "
                                    "to overwrite it", b->flag, b->path, a->flag, a->path);
                drv_usage_error(prog, "%s %s and %s %s are the same file", a->flag, a->path,
                                b->flag, b->path);
            }
        }
    ccr_ctx *ctx = NULL;
    if (ccr_ctx_init(&ctx) != CCR_OK) {
        fprintf(stderr, "%s: cannot allocate a context\n", prog);
        exit(1);
    }
    for (size_t i = 0; i < n_paths; i++) {
        const io_path *p = &paths[i];
        if (!p->out || is_stream(p))
            continue;
        size_t removed = 0;
        if (ccr_tmp_sweep(ctx, p->path, &removed, said_kept, (void *)prog) == CCR_OK &&
            removed > 0)
            fprintf(stderr, "%s: removed %zu stale temporary file%s beside %s\n", prog, removed,
                    removed == 1 ? "" : "s", p->path);
        /* The probe is a temporary like the real one, removed at once. */
        ccr_tmp t;
        if (ccr_tmp_create(ctx, p->path, &t) != CCR_OK) {
            fprintf(stderr, "%s: %s %s: the directory is not writable: %s (try --help)\n", prog,
                    p->flag, p->path, ccr_ctx_errmsg(ctx));
            ccr_ctx_free(ctx);
            exit(2);
        }
        ccr_tmp_release(&t);
    }
    ccr_ctx_free(ctx);
}

/* Writes a C string with write(2) (async-signal-safe). */
static void say(const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static void on_signal(int sig)
{
    int saved = errno;
    for (size_t i = 0; i < MAX_WATCH; i++) {
        if (!watches[i].armed)
            continue;
        watches[i].armed = 0;
        /* A run interrupted before its first result keeps nothing (the
         * getter only reads a counter: safe here). */
        if (ccr_jsonl_lines(watches[i].w) == 0) {
            unlink(watches[i].tmp);
            continue;
        }
        if (rename(watches[i].tmp, watches[i].partial) == 0) {
            say(watch_prog);
            say(": interrupted; the results so far are in ");
            say(watches[i].partial);
            say("\n");
        }
    }
    errno = saved;
    /* SA_RESETHAND restored the default action: die of the same signal. */
    raise(sig);
}

static void at_exit(void)
{
    for (size_t i = 0; i < MAX_WATCH; i++) {
        ccr_jsonl *w = watches[i].w;
        if (w == NULL)
            continue;
        watches[i].armed = 0;
        watches[i].w = NULL;
        char partial[WATCH_PATH];
        const char *pp = ccr_jsonl_lines(w) > 0 ? ccr_jsonl_partial_path(w) : NULL;
        snprintf(partial, sizeof partial, "%s", pp ? pp : "");
        if (ccr_jsonl_abort(w) == CCR_OK && partial[0] != '\0')
            fprintf(stderr, "%s: the run failed; the results so far are in %s\n", watch_prog,
                    partial);
    }
}

void drv_io_watch(const char *prog, ccr_jsonl *w)
{
    static bool installed;
    if (w == NULL)
        return;
    watch_prog = prog;
    if (!installed) {
        installed = true;
        atexit(at_exit);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sa.sa_flags = SA_RESETHAND;
        sigemptyset(&sa.sa_mask);
        sigaddset(&sa.sa_mask, SIGINT);
        sigaddset(&sa.sa_mask, SIGTERM);
        sigaddset(&sa.sa_mask, SIGHUP);
        const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
        for (size_t i = 0; i < 3; i++) {
            struct sigaction old;
            /* A signal ignored by the parent (nohup) stays ignored. */
            if (sigaction(sigs[i], NULL, &old) == 0 && old.sa_handler != SIG_IGN)
                sigaction(sigs[i], &sa, NULL);
        }
    }
    for (size_t i = 0; i < MAX_WATCH; i++) {
        watch *s = &watches[i];
        if (s->w != NULL)
            continue;
        const char *tmp = ccr_jsonl_temp_path(w), *partial = ccr_jsonl_partial_path(w);
        s->w = w;
        /* Only paths that fit are renamed by the handler; exit still works. */
        if (tmp && partial && strlen(tmp) < WATCH_PATH && strlen(partial) < WATCH_PATH) {
            memcpy(s->tmp, tmp, strlen(tmp) + 1);
            memcpy(s->partial, partial, strlen(partial) + 1);
            s->armed = 1;
        }
        return;
    }
}

ccr_status drv_io_close(ccr_jsonl *w)
{
    if (w == NULL)
        return CCR_OK;
    ccr_status s = ccr_jsonl_close(w);
    for (size_t i = 0; i < MAX_WATCH; i++)
        if (watches[i].w == w) {
            watches[i].armed = 0;
            watches[i].w = NULL;
        }
    return s;
}
