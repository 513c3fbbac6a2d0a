/*
 * ccr_data.h - data sets: IDX files (MNIST, Fashion-MNIST) and text corpora.
 *
 * Everything is read through zlib, so each loader accepts gzip-compressed and
 * plain files alike.  Shuffles and splits draw from a caller-owned GSL RNG:
 * the same seed gives the same order on every machine.
 *
 *     ccr_dataset *train;
 *     ccr_dataset_load_idx(ctx, DIR "/train-images-idx3-ubyte.gz",
 *                          DIR "/train-labels-idx1-ubyte.gz", &train);   // x in [0,1]
 *     size_t *perm = malloc(train->n * sizeof *perm);
 *     ccr_permutation(rng, perm, train->n);          // seeded shuffle
 *     ccr_dataset_gather(train, perm, 128, xbatch, ybatch);
 *
 *     ccr_corpus *c;
 *     ccr_corpus_config cc = {.level = CCR_CORPUS_WORD, .vocab_size = 10000};
 *     ccr_corpus_load(ctx, "/usr/share/dictd/gcide.dict.dz", &cc, &c);
 *     ccr_corpus_split(ctx, c, rng, 0.05, 0.05);          // sentences to valid/test
 */
#ifndef CCR_DATA_H
#define CCR_DATA_H

#include <stdint.h>

#include <gsl/gsl_rng.h>

#include "ccr_common.h"
#include "ccr_ctx.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

/* ---- IDX files ----------------------------------------------------------- */

/* IDX element types (the third byte of the magic number). */
typedef enum ccr_idx_type {
    CCR_IDX_U8 = 0x08, CCR_IDX_I8 = 0x09, CCR_IDX_I16 = 0x0B,
    CCR_IDX_I32 = 0x0C, CCR_IDX_F32 = 0x0D, CCR_IDX_F64 = 0x0E
} ccr_idx_type;

#define CCR_IDX_MAX_DIMS 8

/* An IDX array converted to float (values unchanged: a pixel byte 255 is
 * 255.0f).  Big-endian in the file, native here. */
typedef struct ccr_idx {
    ccr_idx_type type;              /* element type in the file */
    size_t ndim;                    /* 1..CCR_IDX_MAX_DIMS */
    size_t dims[CCR_IDX_MAX_DIMS];
    size_t numel;                   /* product of dims */
    float *data;                    /* numel floats, owned */
} ccr_idx;

/* Reads an IDX file (gzip or plain).  Returns CCR_EIO if it cannot be
 * opened or read and CCR_EFORMAT for a bad magic, zero dimensions, a size
 * overflow, or data shorter or longer than the dimensions say. */
ccr_status ccr_idx_load(ccr_ctx *ctx, const char *path, ccr_idx **out);
void ccr_idx_free(ccr_idx *idx);

/* ---- labelled data sets --------------------------------------------------- */

/* n examples of dim floats with integer labels in [0, n_classes). */
typedef struct ccr_dataset {
    size_t n;          /* number of examples */
    size_t dim;        /* features per example */
    size_t n_classes;  /* 1 + largest label */
    float *x;          /* n x dim, row-major, owned */
    int32_t *y;        /* n labels, owned */
} ccr_dataset;

/* Loads an image IDX file (n x rows x cols, or n x dim) and a label IDX file
 * (n) into a data set, scaling u8 pixels to [0, 1].  Returns CCR_EIO,
 * CCR_EFORMAT (counts differ, labels negative or not integers, image file
 * rank 1, a feature that is NaN, infinite or beyond float range) or
 * CCR_ENOMEM. */
ccr_status ccr_dataset_load_idx(ccr_ctx *ctx, const char *images, const char *labels,
                                ccr_dataset **out);

/* Allocates an empty data set of n x dim (x and y zero) for callers that
 * fill it themselves, e.g. synthetic tasks.  n may be 0.  Returns CCR_EINVAL
 * if dim or n_classes is 0, CCR_ENOMEM if it cannot be allocated or is larger
 * than physical memory (or its size overflows). */
ccr_status ccr_dataset_alloc(ccr_ctx *ctx, size_t n, size_t dim, size_t n_classes,
                             ccr_dataset **out);
void ccr_dataset_free(ccr_dataset *ds);

/* Splits ds into a random part of n_second examples and the rest, both new
 * data sets (order of each follows the permutation drawn from rng).  ds is
 * unchanged.  Returns CCR_EINVAL if n_second > ds->n. */
ccr_status ccr_dataset_split(ccr_ctx *ctx, const ccr_dataset *ds, gsl_rng *rng,
                             size_t n_second, ccr_dataset **first, ccr_dataset **second);

/* Copies the examples idx[0..batch) to x (batch x dim) and y (batch). */
void ccr_dataset_gather(const ccr_dataset *ds, const size_t *idx, size_t batch,
                        float *x, int32_t *y);

/* Fills perm with a uniformly random permutation of 0..n-1 drawn from rng
 * (gsl_ran_shuffle).  n == 0 does nothing. */
void ccr_permutation(gsl_rng *rng, size_t *perm, size_t n);

/* ---- text corpora --------------------------------------------------------- */

typedef enum ccr_corpus_level {
    CCR_CORPUS_WORD = 0,  /* word tokens, vocabulary = top-N words + <unk> */
    CCR_CORPUS_CHAR = 1   /* byte tokens, vocabulary = bytes seen */
} ccr_corpus_level;

typedef struct ccr_corpus_config {
    ccr_corpus_level level;
    size_t vocab_size;   /* word level: total vocabulary including the specials
                            (<eos>, <unk>); 0 = every word seen.  Ignored at
                            char level. */
    size_t max_tokens;   /* stop reading once the stream would exceed this many
                            tokens, final <eos> included (n_tokens <=
                            max_tokens); 0 = no limit, 1 is invalid */
} ccr_corpus_config;

/* Token ids.  At word level id 0 is "<eos>" (end of sentence) and id 1 is
 * "<unk>"; then words by decreasing frequency, ties broken by byte order.  At
 * char level id 0 is "<eos>" and the other ids are the distinct bytes seen,
 * in byte order. */
#define CCR_TOKEN_EOS 0
#define CCR_TOKEN_UNK 1

typedef struct ccr_corpus {
    ccr_corpus_level level;
    size_t vocab_size;     /* number of ids */
    char **vocab;          /* id -> NUL-terminated token text, owned */
    size_t n_tokens;       /* all tokens, every sentence ends with <eos> */
    int32_t *tokens;       /* n_tokens ids, owned */
    size_t n_unk;          /* word tokens mapped to <unk> */
    /* After ccr_corpus_split: the three splits, each a run of whole
     * sentences (pointers into split storage owned by the corpus). */
    const int32_t *train, *valid, *test;
    size_t n_train, n_valid, n_test;
} ccr_corpus;

/* Reads a text file (gzip or plain).  Tokenisation, word level: ASCII
 * letters are lower-cased; a word is a maximal run of letters, digits and
 * apostrophes; each of . , ; : ! ? ( ) " is a token of its own; other bytes
 * separate tokens; a sentence ends after . ! or ? and at a blank line.  Char
 * level: every byte is a token except that newlines end sentences.  Before
 * any split, train holds the whole stream.  Returns CCR_EIO, CCR_EFORMAT
 * (no tokens), CCR_EINVAL (vocab_size 1 or 2 at word level, max_tokens 1),
 * CCR_ENOMEM. */
ccr_status ccr_corpus_load(ccr_ctx *ctx, const char *path, const ccr_corpus_config *cfg,
                           ccr_corpus **out);
void ccr_corpus_free(ccr_corpus *c);

/* Assigns whole sentences to valid and test at random (fractions of the
 * sentences, drawn from rng), the rest to train, each split keeping the
 * original sentence order.  Returns CCR_EINVAL if the fractions are negative,
 * NaN or sum to 1 or more. */
ccr_status ccr_corpus_split(ccr_ctx *ctx, ccr_corpus *c, gsl_rng *rng,
                            double valid_frac, double test_frac);

/* The id of a token text, or, if it is not in the vocabulary, CCR_TOKEN_UNK
 * at word level and -1 at char level (which has no <unk>). */
int32_t ccr_corpus_lookup(const ccr_corpus *c, const char *token);

CCR_END_DECLS

#endif /* CCR_DATA_H */
