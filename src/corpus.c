/*
 * corpus.c - text corpora for language modelling: tokenisation at word or
 * byte level, a frequency-ranked vocabulary, lookup and sentence splits.
 *
 * The file is streamed once through zlib (gzip or plain) and tokenised into
 * a temporary stream in which 0 stands for <eos> and k+1 for the k-th
 * distinct word (or byte k at char level).  Words are counted in a small
 * open-addressing hash map (FNV-1a, linear probing) private to this file.
 * The vocabulary is then ranked by decreasing count with ties in byte order,
 * the specials <eos> and <unk> are put in front, and the stream is rewritten
 * in place with the final ids, so the result is deterministic.  The corpus
 * handed out is the public struct at the start of a private one that also
 * holds the vocabulary text, a sorted lookup table and the split storage.
 * Splits assign whole sentences with one gsl_rng_uniform draw each.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "ccr/ccr_data.h"
#include "internal.h"

#define READ_CHUNK ((unsigned)1 << 18)
#define TMP_EOS 0  /* temporary stream: 0 = <eos>, k + 1 = word (or byte) k */

/* ---- private corpus layout ------------------------------------------------ */

typedef struct lookup_ent {
    const char *text;
    int32_t id;
} lookup_ent;

typedef struct corpus_impl {
    ccr_corpus pub;      /* first member: a ccr_corpus * is a corpus_impl * */
    char *text;          /* every vocabulary string, NUL-separated */
    lookup_ent *lookup;  /* vocab_size entries sorted by text */
    int32_t *split;      /* train | valid | test after a split, else NULL */
} corpus_impl;

/* Grows *p (an array of elem-byte items with *cap slots) to hold need items. */
static bool grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return true;
    size_t c = *cap > 0 ? *cap : 16;
    while (c < need) {
        if (c > SIZE_MAX / 2 / elem)
            return false;
        c *= 2;
    }
    void *q = ccr_reallocn(*p, c, elem);
    if (q == NULL)
        return false;
    *p = q;
    *cap = c;
    return true;
}

/* ---- word counts: open-addressing hash map -------------------------------- */

typedef struct word_ent {
    uint64_t hash;
    size_t off, len;  /* text at pool + off, NUL-terminated */
    size_t count;
} word_ent;

typedef struct word_map {
    uint32_t *slots;  /* 0 = empty, else entry index + 1 */
    size_t cap;       /* number of slots, a power of two */
    word_ent *ent;
    size_t n, ent_cap;
    char *pool;
    size_t pool_len, pool_cap;
} word_map;

static uint64_t fnv1a(const char *s, size_t len)
{
    uint64_t h = 14695981039346656037u;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211u;
    }
    return h;
}

static bool map_init(word_map *m)
{
    memset(m, 0, sizeof *m);
    m->cap = 1024;
    m->slots = calloc(m->cap, sizeof *m->slots);
    return m->slots != NULL;
}

static void map_free(word_map *m)
{
    free(m->slots);
    free(m->ent);
    free(m->pool);
}

static bool map_rehash(word_map *m)
{
    if (m->cap > SIZE_MAX / 2 / sizeof *m->slots)
        return false;
    size_t cap = m->cap * 2;
    uint32_t *slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return false;
    for (size_t k = 0; k < m->n; k++) {
        size_t i = (size_t)m->ent[k].hash & (cap - 1);
        while (slots[i] != 0)
            i = (i + 1) & (cap - 1);
        slots[i] = (uint32_t)(k + 1);
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return true;
}

/* Counts one occurrence of w[0..len) and returns its entry index. */
static ccr_status map_add(ccr_ctx *ctx, word_map *m, const char *w, size_t len, size_t *index)
{
    uint64_t h = fnv1a(w, len);
    size_t mask = m->cap - 1;
    size_t i = (size_t)h & mask;
    while (m->slots[i] != 0) {
        word_ent *e = &m->ent[m->slots[i] - 1];
        if (e->hash == h && e->len == len && memcmp(m->pool + e->off, w, len) == 0) {
            e->count++;
            *index = m->slots[i] - 1;
            return CCR_OK;
        }
        i = (i + 1) & mask;
    }
    /* Final ids are 2 + rank and temporary ones k + 1: both must fit in int32. */
    if (m->n >= (size_t)INT32_MAX - 2)
        CCR_FAIL(ctx, CCR_EFORMAT, "more than %d distinct words", INT32_MAX - 2);
    if (len > SIZE_MAX - 1 - m->pool_len ||
        !grow((void **)&m->pool, &m->pool_cap, m->pool_len + len + 1, 1) ||
        !grow((void **)&m->ent, &m->ent_cap, m->n + 1, sizeof *m->ent))
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot grow the word table (%zu words)", m->n);
    memcpy(m->pool + m->pool_len, w, len);
    m->pool[m->pool_len + len] = '\0';
    m->ent[m->n] = (word_ent){.hash = h, .off = m->pool_len, .len = len, .count = 1};
    m->pool_len += len + 1;
    m->slots[i] = (uint32_t)(m->n + 1);
    *index = m->n;
    m->n++;
    if (2 * m->n > m->cap && !map_rehash(m))
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot grow the word table (%zu words)", m->n);
    return CCR_OK;
}

/* ---- tokeniser ------------------------------------------------------------- */

typedef struct tokenizer {
    ccr_ctx *ctx;
    ccr_corpus_level level;
    size_t limit;    /* max_tokens, 0 = none */
    bool stopped;    /* the limit was reached */
    int32_t *tok;    /* temporary stream */
    size_t n, cap;
    word_map map;    /* word level */
    char *word;      /* word being read */
    size_t wlen, wcap;
    bool blank;      /* word level: only whitespace since the last newline */
    bool seen[256];  /* char level: bytes in the stream */
} tokenizer;

static bool is_word_byte(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '\'';
}

static bool is_punct_byte(unsigned char c)
{
    return c == '.' || c == ',' || c == ';' || c == ':' || c == '!' || c == '?' || c == '(' ||
           c == ')' || c == '"';
}

static bool is_blank_byte(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

static ccr_status tz_push(tokenizer *tz, int32_t v)
{
    if (!grow((void **)&tz->tok, &tz->cap, tz->n + 1, sizeof *tz->tok))
        CCR_FAIL(tz->ctx, CCR_ENOMEM, "cannot grow the token stream (%zu tokens)", tz->n);
    tz->tok[tz->n++] = v;
    return CCR_OK;
}

/* Whether one more non-<eos> token fits, keeping a slot for the final <eos>;
 * sets stopped when not.  After a non-<eos> token n <= limit - 1, so the
 * <eos> that follows always fits. */
static bool tz_room(tokenizer *tz)
{
    if (tz->limit != 0 && tz->n + 2 > tz->limit)
        tz->stopped = true;
    return !tz->stopped;
}

/* <eos>, except at the start of the stream or right after another <eos>. */
static ccr_status tz_eos(tokenizer *tz)
{
    if (tz->n == 0 || tz->tok[tz->n - 1] == TMP_EOS)
        return CCR_OK;
    return tz_push(tz, TMP_EOS);
}

static ccr_status tz_word(tokenizer *tz, const char *w, size_t len)
{
    if (!tz_room(tz))
        return CCR_OK;
    size_t k = 0;
    CCR_TRY(map_add(tz->ctx, &tz->map, w, len, &k));
    return tz_push(tz, (int32_t)(k + 1));
}

static ccr_status tz_feed_words(tokenizer *tz, const unsigned char *buf, size_t len)
{
    for (size_t i = 0; i < len && !tz->stopped; i++) {
        unsigned char c = buf[i];
        if (is_word_byte(c)) {
            if (tz->wlen == tz->wcap &&
                !grow((void **)&tz->word, &tz->wcap, tz->wlen + 1, 1))
                CCR_FAIL(tz->ctx, CCR_ENOMEM, "cannot grow a word of %zu bytes", tz->wlen);
            tz->word[tz->wlen++] = (char)((c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c);
            tz->blank = false;
            continue;
        }
        if (tz->wlen > 0) {
            CCR_TRY(tz_word(tz, tz->word, tz->wlen));
            tz->wlen = 0;
            if (tz->stopped)
                break;
        }
        if (c == '\n') {
            if (tz->blank)
                CCR_TRY(tz_eos(tz));
            tz->blank = true;
        } else if (!is_blank_byte(c)) {
            tz->blank = false;
            if (is_punct_byte(c)) {
                char p = (char)c;
                CCR_TRY(tz_word(tz, &p, 1));
                if (!tz->stopped && (c == '.' || c == '!' || c == '?'))
                    CCR_TRY(tz_eos(tz));
            }
        }
    }
    return CCR_OK;
}

static ccr_status tz_feed_chars(tokenizer *tz, const unsigned char *buf, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = buf[i];
        if (c == '\n') {
            CCR_TRY(tz_eos(tz));
        } else {
            if (!tz_room(tz))
                break;
            tz->seen[c] = true;
            CCR_TRY(tz_push(tz, (int32_t)c + 1));
        }
    }
    return CCR_OK;
}

/* Maps the error state of a zlib stream to a status (CCR_OK if none). */
static ccr_status gz_status(ccr_ctx *ctx, gzFile f, const char *path)
{
    int errnum = Z_OK;
    const char *msg = gzerror(f, &errnum);
    switch (errnum) {
    case Z_OK:
        return CCR_OK;
    case Z_BUF_ERROR:
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': truncated gzip stream (%s)", path, msg);
    case Z_DATA_ERROR:
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': corrupt gzip data (%s)", path, msg);
    case Z_MEM_ERROR:
        CCR_FAIL(ctx, CCR_ENOMEM, "'%s': zlib out of memory", path);
    case Z_ERRNO:
        CCR_FAIL(ctx, CCR_EIO, "'%s': read error: %s", path, strerror(errno));
    default:
        CCR_FAIL(ctx, CCR_EIO, "'%s': read error (%s)", path, msg);
    }
}

/* Streams the file through the tokeniser and appends the final <eos>. */
static ccr_status tz_read(tokenizer *tz, const char *path)
{
    ccr_ctx *ctx = tz->ctx;
    errno = 0;
    gzFile f = gzopen(path, "rb");
    if (f == NULL)
        CCR_FAIL(ctx, CCR_EIO, "cannot open '%s': %s", path,
                 errno != 0 ? strerror(errno) : "out of memory");
    gzbuffer(f, 1u << 17);
    unsigned char *buf = malloc(READ_CHUNK);
    ccr_status s = CCR_OK;
    if (buf == NULL)
        s = CCR_FAIL_EXPR(ctx, CCR_ENOMEM, "cannot allocate a read buffer");
    while (s == CCR_OK && !tz->stopped) {
        int r = gzread(f, buf, READ_CHUNK);
        if (r <= 0) {
            s = gz_status(ctx, f, path);
            if (s == CCR_OK && r < 0)
                s = CCR_FAIL_EXPR(ctx, CCR_EIO, "'%s': read error", path);
            break;
        }
        if (tz->level == CCR_CORPUS_WORD)
            s = tz_feed_words(tz, buf, (size_t)r);
        else
            s = tz_feed_chars(tz, buf, (size_t)r);
    }
    free(buf);
    gzclose(f);
    if (s == CCR_OK && tz->wlen > 0 && !tz->stopped)
        s = tz_word(tz, tz->word, tz->wlen);
    if (s == CCR_OK)
        s = tz_eos(tz);
    if (s == CCR_OK && tz->n == 0)
        s = CCR_FAIL_EXPR(ctx, CCR_EFORMAT, "'%s': no tokens", path);
    return s;
}

/* ---- vocabulary ------------------------------------------------------------- */

typedef struct rank_ent {
    const char *text;
    size_t count;
    size_t index;  /* entry in the word map */
} rank_ent;

static int rank_cmp(const void *pa, const void *pb)
{
    const rank_ent *a = pa, *b = pb;
    if (a->count != b->count)
        return a->count > b->count ? -1 : 1;
    return strcmp(a->text, b->text);
}

static int lookup_cmp(const void *pa, const void *pb)
{
    return strcmp(((const lookup_ent *)pa)->text, ((const lookup_ent *)pb)->text);
}

static int lookup_key_cmp(const void *key, const void *pe)
{
    return strcmp((const char *)key, ((const lookup_ent *)pe)->text);
}

/* Allocates vocab, text (text_bytes) and lookup for v ids. */
static ccr_status vocab_alloc(ccr_ctx *ctx, corpus_impl *ci, size_t v, size_t text_bytes)
{
    ci->pub.vocab = calloc(v, sizeof *ci->pub.vocab);
    ci->lookup = calloc(v, sizeof *ci->lookup);
    ci->text = malloc(text_bytes);
    if (ci->pub.vocab == NULL || ci->lookup == NULL || ci->text == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate a vocabulary of %zu", v);
    ci->pub.vocab_size = v;
    return CCR_OK;
}

/* Appends s as id `id` at *pos in the text block. */
static void vocab_set(corpus_impl *ci, int32_t id, const char *s, size_t len, size_t *pos)
{
    char *dst = ci->text + *pos;
    memcpy(dst, s, len);
    dst[len] = '\0';
    *pos += len + 1;
    ci->pub.vocab[id] = dst;
    ci->lookup[id] = (lookup_ent){.text = dst, .id = id};
}

static ccr_status build_word_vocab(ccr_ctx *ctx, tokenizer *tz, size_t vocab_size,
                                   corpus_impl *ci)
{
    const word_map *m = &tz->map;
    size_t v = m->n + 2;
    if (vocab_size != 0 && vocab_size < v)
        v = vocab_size;
    rank_ent *rank = ccr_mallocn(m->n, sizeof *rank);
    int32_t *remap = ccr_mallocn(m->n, sizeof *remap);
    if (rank == NULL || remap == NULL) {
        free(rank);
        free(remap);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot rank %zu words", m->n);
    }
    for (size_t k = 0; k < m->n; k++) {
        rank[k] = (rank_ent){.text = m->pool + m->ent[k].off, .count = m->ent[k].count,
                             .index = k};
        remap[k] = CCR_TOKEN_UNK;
    }
    qsort(rank, m->n, sizeof *rank, rank_cmp);
    size_t bytes = sizeof "<eos>" + sizeof "<unk>";
    for (size_t r = 0; r + 2 < v; r++)
        bytes += m->ent[rank[r].index].len + 1;  /* <= pool_len: no overflow */
    ccr_status s = vocab_alloc(ctx, ci, v, bytes);
    if (s == CCR_OK) {
        size_t pos = 0;
        vocab_set(ci, CCR_TOKEN_EOS, "<eos>", 5, &pos);
        vocab_set(ci, CCR_TOKEN_UNK, "<unk>", 5, &pos);
        for (size_t r = 0; r + 2 < v; r++) {
            int32_t id = (int32_t)(r + 2);
            remap[rank[r].index] = id;
            vocab_set(ci, id, rank[r].text, m->ent[rank[r].index].len, &pos);
        }
        size_t unk = 0;
        for (size_t i = 0; i < tz->n; i++) {
            int32_t t = tz->tok[i];
            if (t != TMP_EOS) {
                t = remap[t - 1];
                unk += t == CCR_TOKEN_UNK;
                tz->tok[i] = t;
            }
        }
        ci->pub.n_unk = unk;
    }
    free(rank);
    free(remap);
    return s;
}

static ccr_status build_char_vocab(ccr_ctx *ctx, tokenizer *tz, corpus_impl *ci)
{
    int32_t remap[256];
    size_t v = 1;
    for (int b = 0; b < 256; b++)
        remap[b] = tz->seen[b] ? (int32_t)v++ : CCR_TOKEN_EOS;
    CCR_TRY(vocab_alloc(ctx, ci, v, sizeof "<eos>" + 2 * (v - 1))); /* bounded: v <= 257 bytes */
    size_t pos = 0;
    vocab_set(ci, CCR_TOKEN_EOS, "<eos>", 5, &pos);
    for (int b = 0; b < 256; b++) {
        if (tz->seen[b]) {
            char ch = (char)(unsigned char)b;
            vocab_set(ci, remap[b], &ch, 1, &pos);
        }
    }
    for (size_t i = 0; i < tz->n; i++)
        if (tz->tok[i] != TMP_EOS)
            tz->tok[i] = remap[tz->tok[i] - 1];
    ci->pub.n_unk = 0;
    return CCR_OK;
}

/* ---- public API -------------------------------------------------------------- */

void ccr_corpus_free(ccr_corpus *c)
{
    if (c == NULL)
        return;
    corpus_impl *ci = (corpus_impl *)c;
    free(c->tokens);
    free(c->vocab);
    free(ci->text);
    free(ci->lookup);
    free(ci->split);
    free(ci);
}

ccr_status ccr_corpus_load(ccr_ctx *ctx, const char *path, const ccr_corpus_config *cfg,
                           ccr_corpus **out)
{
    CCR_CHECK_NULL(ctx, path);
    CCR_CHECK_NULL(ctx, cfg);
    CCR_CHECK_NULL(ctx, out);
    if (cfg->level != CCR_CORPUS_WORD && cfg->level != CCR_CORPUS_CHAR)
        CCR_FAIL(ctx, CCR_EINVAL, "unknown corpus level %d", (int)cfg->level);
    if (cfg->level == CCR_CORPUS_WORD && (cfg->vocab_size == 1 || cfg->vocab_size == 2))
        CCR_FAIL(ctx, CCR_EINVAL, "vocab_size %zu leaves no room for words (want 0 or >= 3)",
                 cfg->vocab_size);
    if (cfg->max_tokens == 1)
        CCR_FAIL(ctx, CCR_EINVAL, "max_tokens 1 cannot hold a token and its <eos>");

    tokenizer *tz = calloc(1, sizeof *tz);
    corpus_impl *ci = calloc(1, sizeof *ci);
    if (tz == NULL || ci == NULL || !map_init(&tz->map)) {
        if (tz != NULL)
            map_free(&tz->map);
        free(tz);
        free(ci);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate a corpus");
    }
    tz->ctx = ctx;
    tz->level = cfg->level;
    tz->limit = cfg->max_tokens;

    ccr_status s = tz_read(tz, path);
    if (s == CCR_OK) {
        if (cfg->level == CCR_CORPUS_WORD)
            s = build_word_vocab(ctx, tz, cfg->vocab_size, ci);
        else
            s = build_char_vocab(ctx, tz, ci);
    }
    if (s == CCR_OK) {
        qsort(ci->lookup, ci->pub.vocab_size, sizeof *ci->lookup, lookup_cmp);
        int32_t *tok = ccr_reallocn(tz->tok, tz->n, sizeof *tok);  /* shrink; n > 0 */
        if (tok != NULL)
            tz->tok = tok;
        ccr_corpus *c = &ci->pub;
        c->level = cfg->level;
        c->n_tokens = tz->n;
        c->tokens = tz->tok;
        tz->tok = NULL;
        c->train = c->tokens;
        c->n_train = c->n_tokens;
        c->valid = c->test = c->tokens + c->n_tokens;  /* empty */
        c->n_valid = c->n_test = 0;
        *out = c;
        ci = NULL;
    }
    if (ci != NULL)
        ccr_corpus_free(&ci->pub);
    map_free(&tz->map);
    free(tz->word);
    free(tz->tok);
    free(tz);
    return s;
}

int32_t ccr_corpus_lookup(const ccr_corpus *c, const char *token)
{
    if (c == NULL)
        return -1;
    int32_t missing = c->level == CCR_CORPUS_WORD ? CCR_TOKEN_UNK : -1;
    if (token == NULL)
        return missing;
    const corpus_impl *ci = (const corpus_impl *)c;
    const lookup_ent *e =
        bsearch(token, ci->lookup, c->vocab_size, sizeof *ci->lookup, lookup_key_cmp);
    return e != NULL ? e->id : missing;
}

ccr_status ccr_corpus_split(ccr_ctx *ctx, ccr_corpus *c, gsl_rng *rng, double valid_frac,
                            double test_frac)
{
    CCR_CHECK_NULL(ctx, c);
    CCR_CHECK_NULL(ctx, rng);
    if (isnan(valid_frac) || isnan(test_frac) || valid_frac < 0.0 || test_frac < 0.0 ||
        !(valid_frac + test_frac < 1.0))
        CCR_FAIL(ctx, CCR_EINVAL,
                 "fractions valid %g and test %g must be >= 0 and sum to less than 1",
                 valid_frac, test_frac);
    size_t n = c->n_tokens;
    if (n == 0 || c->tokens == NULL || c->tokens[n - 1] != CCR_TOKEN_EOS)
        CCR_FAIL(ctx, CCR_EINVAL, "corpus stream is empty or does not end with <eos>");
    size_t n_sent = 0;
    for (size_t i = 0; i < n; i++)
        n_sent += c->tokens[i] == CCR_TOKEN_EOS;

    int32_t *store = ccr_mallocn(n, sizeof *store);
    unsigned char *where = malloc(n_sent);
    if (store == NULL || where == NULL) {
        free(store);
        free(where);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate a split of %zu tokens", n);
    }
    /* Draw: 0 train, 1 valid, 2 test; count tokens per split. */
    size_t len[3] = {0, 0, 0};
    size_t start = 0, sent = 0;
    for (size_t i = 0; i < n; i++) {
        if (c->tokens[i] != CCR_TOKEN_EOS)
            continue;
        double u = gsl_rng_uniform(rng);
        unsigned char w = u < valid_frac ? 1 : u < valid_frac + test_frac ? 2 : 0;
        where[sent++] = w;
        len[w] += i + 1 - start;
        start = i + 1;
    }
    size_t pos[3] = {0, len[0], len[0] + len[1]};
    start = 0;
    sent = 0;
    for (size_t i = 0; i < n; i++) {
        if (c->tokens[i] != CCR_TOKEN_EOS)
            continue;
        unsigned char w = where[sent++];
        memcpy(store + pos[w], c->tokens + start, (i + 1 - start) * sizeof *store);
        pos[w] += i + 1 - start;
        start = i + 1;
    }
    free(where);

    corpus_impl *ci = (corpus_impl *)c;
    free(ci->split);
    ci->split = store;
    c->train = store;
    c->valid = store + len[0];
    c->test = store + len[0] + len[1];
    c->n_train = len[0];
    c->n_valid = len[1];
    c->n_test = len[2];
    return CCR_OK;
}
