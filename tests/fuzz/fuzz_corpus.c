/*
 * fuzz_corpus.c - ccr_corpus_load on arbitrary text, word and char level.
 * Byte 0 chooses the level (bit 0) and the word vocabulary size (bits 1-7,
 * so 0 = every word, 1 and 2 are invalid), byte 1 the token limit (0 = none,
 * 1 is invalid); the rest is the file.  An accepted corpus has ids below
 * vocab_size, ends with <eos>, respects the limit, and splits and looks up
 * without error.
 */
#include <gsl/gsl_rng.h>

#include "ccr/ccr.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    ccr_corpus_config cfg = {.level = (data[0] & 1) ? CCR_CORPUS_CHAR : CCR_CORPUS_WORD,
                             .vocab_size = data[0] >> 1, .max_tokens = data[1]};
    ccr_ctx *ctx = NULL;
    const char *path = fuzz_file(0, data + 2, size - 2);
    if (path == NULL || ccr_ctx_init(&ctx) != CCR_OK)
        return 0;
    ccr_corpus *c = NULL;
    if (ccr_corpus_load(ctx, path, &cfg, &c) == CCR_OK) {
        FUZZ_ASSERT(c->n_tokens > 0 && c->tokens[c->n_tokens - 1] == CCR_TOKEN_EOS, "eos");
        FUZZ_ASSERT(cfg.max_tokens == 0 || c->n_tokens <= cfg.max_tokens, "max_tokens");
        FUZZ_ASSERT(cfg.level == CCR_CORPUS_CHAR || cfg.vocab_size == 0 ||
                        c->vocab_size <= cfg.vocab_size, "vocab_size");
        for (size_t i = 0; i < c->n_tokens; i++)
            FUZZ_ASSERT(c->tokens[i] >= 0 && (size_t)c->tokens[i] < c->vocab_size, "id range");
        for (size_t v = 0; v < c->vocab_size; v++) {
            int32_t id = ccr_corpus_lookup(c, c->vocab[v]);
            FUZZ_ASSERT(id == (int32_t)v || (v <= CCR_TOKEN_UNK && id >= 0), "lookup");
        }
        gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
        if (rng != NULL) {
            if (ccr_corpus_split(ctx, c, rng, 0.25, 0.25) == CCR_OK)
                FUZZ_ASSERT(c->n_train + c->n_valid + c->n_test == c->n_tokens, "split");
            gsl_rng_free(rng);
        }
        ccr_corpus_free(c);
    }
    ccr_ctx_free(ctx);
    return 0;
}
