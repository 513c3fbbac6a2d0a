/*
 * test_corpus.c - tests of the text corpora: word and char tokenisation,
 * vocabulary order, <unk>, max_tokens, gzip input, load errors and seeded
 * sentence splits.  Every file is written by the test itself under
 * ccr_test_path and removed afterwards.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

/* ---- corpora ------------------------------------------------------------------- */

static ccr_corpus *load_text(ccr_ctx *ctx, const char *text, ccr_corpus_level level,
                             size_t vocab_size, size_t max_tokens)
{
    ccr_test_tpath p = ccr_test_tmp_path("corpus.txt");
    ck_assert_int_eq(ccr_test_write_file(p.s, text, strlen(text)), 0);
    ccr_corpus_config cfg = {.level = level, .vocab_size = vocab_size,
                             .max_tokens = max_tokens};
    ccr_corpus *c = NULL;
    CCR_CK_OK(ctx, ccr_corpus_load(ctx, p.s, &cfg, &c));
    remove(p.s);
    return c;
}

/* Asserts the token texts of c are exactly want[0..n). */
static void expect_tokens(const ccr_corpus *c, const char *const *want, size_t n)
{
    ck_assert_uint_eq(c->n_tokens, n);
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_ge(c->tokens[i], 0);
        ck_assert_uint_lt((size_t)c->tokens[i], c->vocab_size);
        ck_assert_msg(strcmp(c->vocab[c->tokens[i]], want[i]) == 0,
                      "token %zu is '%s', want '%s'", i, c->vocab[c->tokens[i]], want[i]);
    }
}

static const char WORD_TEXT[] =
    "\n\nThe cat sat. The dog, the CAT!\n"
    "It's (really) \"odd\"?\n\n  \n"
    "New para here\n \t\n"
    "and more";

static const char *const WORD_TOKENS[] = {
    "the", "cat", "sat", ".", "<eos>", "the", "dog", ",", "the", "cat", "!", "<eos>",
    "it's", "(", "really", ")", "\"", "odd", "\"", "?", "<eos>",
    "new", "para", "here", "<eos>", "and", "more", "<eos>"};

/* Frequency order, ties in byte order. */
static const char *const WORD_VOCAB[] = {
    "<eos>", "<unk>", "the", "\"", "cat", "!", "(", ")", ",", ".", "?",
    "and", "dog", "here", "it's", "more", "new", "odd", "para", "really", "sat"};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

START_TEST(test_corpus_word)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_corpus *c = load_text(ctx, WORD_TEXT, CCR_CORPUS_WORD, 0, 0);
    ck_assert_int_eq(c->level, CCR_CORPUS_WORD);
    expect_tokens(c, WORD_TOKENS, COUNT(WORD_TOKENS));
    ck_assert_uint_eq(c->vocab_size, COUNT(WORD_VOCAB));
    for (size_t i = 0; i < COUNT(WORD_VOCAB); i++)
        ck_assert_str_eq(c->vocab[i], WORD_VOCAB[i]);
    ck_assert_uint_eq(c->n_unk, 0);
    ck_assert_ptr_eq(c->train, c->tokens);
    ck_assert_uint_eq(c->n_train, c->n_tokens);
    ck_assert_uint_eq(c->n_valid + c->n_test, 0);
    for (size_t i = 0; i < COUNT(WORD_VOCAB); i++)
        ck_assert_int_eq(ccr_corpus_lookup(c, WORD_VOCAB[i]), (int32_t)i);
    ck_assert_int_eq(ccr_corpus_lookup(c, "zebra"), CCR_TOKEN_UNK);
    ck_assert_int_eq(ccr_corpus_lookup(c, "The"), CCR_TOKEN_UNK);  /* vocab is lower case */
    ccr_corpus_free(c);

    /* vocab_size 5 keeps <eos> <unk> the " cat; everything else is <unk>. */
    c = load_text(ctx, WORD_TEXT, CCR_CORPUS_WORD, 5, 0);
    ck_assert_uint_eq(c->vocab_size, 5);
    size_t unk = 0;
    ck_assert_uint_eq(c->n_tokens, COUNT(WORD_TOKENS));
    for (size_t i = 0; i < COUNT(WORD_TOKENS); i++) {
        int32_t want = ccr_corpus_lookup(c, WORD_TOKENS[i]);
        ck_assert_int_eq(c->tokens[i], want);
        unk += want == CCR_TOKEN_UNK;
    }
    ck_assert_uint_eq(unk, 16);
    ck_assert_uint_eq(c->n_unk, 16);
    ck_assert_int_eq(ccr_corpus_lookup(c, "cat"), 4);
    ck_assert_int_eq(ccr_corpus_lookup(c, "dog"), CCR_TOKEN_UNK);
    ccr_corpus_free(c);

    /* vocab_size larger than the words seen: only the ids that exist. */
    c = load_text(ctx, WORD_TEXT, CCR_CORPUS_WORD, 1000, 0);
    ck_assert_uint_eq(c->vocab_size, COUNT(WORD_VOCAB));
    ccr_corpus_free(c);

    /* max_tokens: the stream is cut and still ends with <eos>, within the limit. */
    c = load_text(ctx, WORD_TEXT, CCR_CORPUS_WORD, 0, 4);
    const char *const cut4[] = {"the", "cat", "sat", "<eos>"};
    expect_tokens(c, cut4, 4);
    ck_assert_uint_eq(c->vocab_size, 5);  /* only words read count */
    ccr_corpus_free(c);
    c = load_text(ctx, WORD_TEXT, CCR_CORPUS_WORD, 0, 7);
    const char *const cut7[] = {"the", "cat", "sat", ".", "<eos>", "the", "<eos>"};
    expect_tokens(c, cut7, 7);
    ccr_corpus_free(c);

    /* Separators: non-ASCII bytes, hyphens, markup; digits and apostrophes join. */
    c = load_text(ctx, "na\xc3\xafve co-op <b>x2</b> rock'n'roll 3.5", CCR_CORPUS_WORD, 0,
                  0);
    const char *const sep[] = {"na", "ve", "co", "op", "b", "x2", "b", "rock'n'roll",
                               "3", ".", "<eos>", "5", "<eos>"};
    expect_tokens(c, sep, COUNT(sep));
    ccr_corpus_free(c);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_corpus_char)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_corpus *c = load_text(ctx, "\nab\n\n\nba c\nx\x01\xff", CCR_CORPUS_CHAR, 3, 0);
    ck_assert_int_eq(c->level, CCR_CORPUS_CHAR);
    /* ids: <eos>, 0x01, ' ', a, b, c, x, 0xff */
    ck_assert_uint_eq(c->vocab_size, 8);
    ck_assert_str_eq(c->vocab[0], "<eos>");
    const char *const bytes[] = {"\x01", " ", "a", "b", "c", "x", "\xff"};
    for (int i = 0; i < 7; i++)
        ck_assert_str_eq(c->vocab[i + 1], bytes[i]);
    const int32_t want[] = {3, 4, 0, 4, 3, 2, 5, 0, 6, 1, 7, 0};
    ck_assert_uint_eq(c->n_tokens, COUNT(want));
    ck_assert_mem_eq(c->tokens, want, sizeof want);
    ck_assert_uint_eq(c->n_unk, 0);
    ck_assert_int_eq(ccr_corpus_lookup(c, "b"), 4);
    ck_assert_int_eq(ccr_corpus_lookup(c, "<eos>"), 0);
    ck_assert_int_eq(ccr_corpus_lookup(c, "z"), -1);
    ck_assert_int_eq(ccr_corpus_lookup(c, "ab"), -1);
    ccr_corpus_free(c);

    c = load_text(ctx, "abc\ndef\n", CCR_CORPUS_CHAR, 0, 3);
    const int32_t cut[] = {1, 2, 0};  /* <eos> a b */
    ck_assert_uint_eq(c->n_tokens, 3);
    ck_assert_mem_eq(c->tokens, cut, sizeof cut);
    ck_assert_uint_eq(c->vocab_size, 3);
    ccr_corpus_free(c);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_corpus_errors)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_test_tpath p = ccr_test_tmp_path("err.txt");
    ccr_corpus *sentinel = (ccr_corpus *)(uintptr_t)0x42, *out = sentinel;
    ccr_corpus_config cfg = {.level = CCR_CORPUS_WORD, .vocab_size = 2};
    ck_assert_int_eq(ccr_test_write_file(p.s, "hello world.", 12), 0);
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out), CCR_EINVAL);
    cfg.vocab_size = 1;
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out), CCR_EINVAL);
    cfg.vocab_size = 3;
    cfg.max_tokens = 1;
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out), CCR_EINVAL);
    cfg.max_tokens = 0;
    cfg.level = (ccr_corpus_level)7;
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out), CCR_EINVAL);
    cfg.level = CCR_CORPUS_WORD;
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, NULL, &cfg, &out), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, NULL, &out), CCR_EINVAL);
    ck_assert_ptr_eq(out, sentinel);
    /* vocab_size 3 is valid: <eos> <unk> and the top word. */
    CCR_CK_OK(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out));
    ck_assert_uint_eq(out->vocab_size, 3);
    ck_assert_str_eq(out->vocab[2], ".");  /* all counts 1: byte order puts "." first */
    ck_assert_uint_eq(out->n_unk, 2);
    ccr_corpus_free(out);
    out = sentinel;

    ck_assert_int_eq(ccr_test_write_file(p.s, "", 0), 0);
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out), CCR_EFORMAT);
    ck_assert_int_eq(ccr_test_write_file(p.s, "\n \n-- <>\n", 9), 0);
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out), CCR_EFORMAT);
    cfg.level = CCR_CORPUS_CHAR;
    ck_assert_int_eq(ccr_test_write_file(p.s, "\n\n\n", 3), 0);
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out), CCR_EFORMAT);
    remove(p.s);
    CCR_CK_STATUS(ctx, ccr_corpus_load(ctx, p.s, &cfg, &out), CCR_EIO);
    ck_assert_ptr_eq(out, sentinel);
    ccr_corpus_free(NULL);
    ck_assert_int_eq(ccr_corpus_lookup(NULL, "a"), -1);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_corpus_gzip)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_test_tpath gz = ccr_test_tmp_path("corpus.txt.gz");
    ck_assert_int_eq(ccr_test_write_gz(gz.s, WORD_TEXT, strlen(WORD_TEXT)), 0);
    ccr_corpus_config cfg = {.level = CCR_CORPUS_WORD};
    ccr_corpus *c = NULL;
    CCR_CK_OK(ctx, ccr_corpus_load(ctx, gz.s, &cfg, &c));
    expect_tokens(c, WORD_TOKENS, COUNT(WORD_TOKENS));
    ccr_corpus_free(c);
    remove(gz.s);
    ccr_ctx_free(ctx);
}
END_TEST

/* Sentence number of the sentence starting at t (its 2nd token is "s<k>"). */
static int sentence_no(const ccr_corpus *c, const int32_t *t)
{
    const char *w = c->vocab[t[1]];
    ck_assert(w[0] == 's');
    return atoi(w + 1);
}

/* Walks one split: every sentence there is "w s<k> . <eos>" with k increasing;
 * marks seen[k] and records where[k] = which. */
static void walk_split(const ccr_corpus *c, const int32_t *t, size_t n, int which,
                       int *seen, int *where)
{
    int last = -1;
    ck_assert(n % 4 == 0);
    for (size_t i = 0; i < n; i += 4) {
        ck_assert_int_eq(t[i + 3], CCR_TOKEN_EOS);
        int k = sentence_no(c, t + i);
        ck_assert_int_gt(k, last);
        last = k;
        seen[k]++;
        where[k] = which;
    }
}

enum { N_SENT = 400 };

START_TEST(test_corpus_split)
{
    ccr_ctx *ctx = ccr_test_ctx();
    static char text[N_SENT * 24];
    size_t len = 0;
    for (int i = 0; i < N_SENT; i++)
        len += (size_t)snprintf(text + len, sizeof text - len, "w%d s%d.%s", i % 5, i,
                                i % 3 == 0 ? "\n" : " ");
    ccr_corpus *c = load_text(ctx, text, CCR_CORPUS_WORD, 0, 0);
    ck_assert_uint_eq(c->n_tokens, 4 * N_SENT);

    gsl_rng *rng = ccr_test_rng(42);
    CCR_CK_OK(ctx, ccr_corpus_split(ctx, c, rng, 0.2, 0.1));
    ck_assert_uint_eq(c->n_train + c->n_valid + c->n_test, c->n_tokens);
    static int seen[N_SENT], where[N_SENT];
    memset(seen, 0, sizeof seen);
    walk_split(c, c->train, c->n_train, 0, seen, where);
    walk_split(c, c->valid, c->n_valid, 1, seen, where);
    walk_split(c, c->test, c->n_test, 2, seen, where);
    for (int k = 0; k < N_SENT; k++)
        ck_assert_int_eq(seen[k], 1);  /* each sentence in exactly one split */
    /* One uniform draw per sentence, in order: u < 0.2 valid, < 0.3 test. */
    gsl_rng *ref = ccr_test_rng(42);
    int n_valid = 0, n_test = 0;
    for (int k = 0; k < N_SENT; k++) {
        double u = gsl_rng_uniform(ref);
        int w = u < 0.2 ? 1 : u < 0.3 ? 2 : 0;
        ck_assert_int_eq(where[k], w);
        n_valid += w == 1;
        n_test += w == 2;
    }
    ck_assert_int_gt(n_valid, 40);
    ck_assert_int_gt(n_test, 15);
    ck_assert_uint_eq(c->n_valid, 4 * (size_t)n_valid);

    /* Re-splitting with the same seed reproduces it; another seed differs. */
    static int32_t first_valid[4 * N_SENT];
    size_t first_n_valid = c->n_valid;
    memcpy(first_valid, c->valid, c->n_valid * sizeof(int32_t));
    gsl_rng_set(rng, 42);
    CCR_CK_OK(ctx, ccr_corpus_split(ctx, c, rng, 0.2, 0.1));
    ck_assert_uint_eq(c->n_valid, first_n_valid);
    ck_assert_mem_eq(c->valid, first_valid, first_n_valid * sizeof(int32_t));
    gsl_rng_set(rng, 43);
    CCR_CK_OK(ctx, ccr_corpus_split(ctx, c, rng, 0.2, 0.1));
    ck_assert(c->n_valid != first_n_valid ||
              memcmp(c->valid, first_valid, first_n_valid * sizeof(int32_t)) != 0);

    /* Zero fractions: everything in train, in order. */
    CCR_CK_OK(ctx, ccr_corpus_split(ctx, c, rng, 0.0, 0.0));
    ck_assert_uint_eq(c->n_train, c->n_tokens);
    ck_assert_mem_eq(c->train, c->tokens, c->n_tokens * sizeof(int32_t));

    /* Invalid fractions leave the split as it was. */
    CCR_CK_STATUS(ctx, ccr_corpus_split(ctx, c, rng, -0.1, 0.1), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_corpus_split(ctx, c, rng, 0.1, -0.1), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_corpus_split(ctx, c, rng, 0.5, 0.5), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_corpus_split(ctx, c, rng, NAN, 0.1), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_corpus_split(ctx, c, rng, 0.1, NAN), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_corpus_split(ctx, c, rng, INFINITY, 0.0), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_corpus_split(ctx, c, NULL, 0.1, 0.1), CCR_EINVAL);
    ck_assert_uint_eq(c->n_train, c->n_tokens);

    ccr_corpus_free(c);
    gsl_rng_free(rng);
    gsl_rng_free(ref);
    ccr_ctx_free(ctx);
}
END_TEST

static Suite *corpus_suite(void)
{
    Suite *s = suite_create("corpus");
    TCase *tc = tcase_create("corpus");
    tcase_add_test(tc, test_corpus_word);
    tcase_add_test(tc, test_corpus_char);
    tcase_add_test(tc, test_corpus_errors);
    tcase_add_test(tc, test_corpus_gzip);
    tcase_add_test(tc, test_corpus_split);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return ccr_test_run(corpus_suite());
}
