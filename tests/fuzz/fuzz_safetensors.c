/*
 * fuzz_safetensors.c - ccr_safetensors_read on arbitrary bytes.  A file it
 * accepts must be self-consistent: every tensor's numel fits its dtype and
 * its data is readable, names are unique and found by name, metadata keys
 * find their values.
 */
#include <string.h>

#include "ccr/ccr.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_file(0, data, size);
    ccr_ctx *ctx = NULL;
    if (path == NULL || ccr_ctx_init(&ctx) != CCR_OK)
        return 0;
    ccr_safetensors *f = NULL;
    ccr_status s = ccr_safetensors_read(ctx, path, &f);
    if (s == CCR_OK) {
        size_t n = ccr_safetensors_count(f), bytes = 0;
        for (size_t i = 0; i < n; i++) {
            const ccr_st_tensor *t = ccr_safetensors_at(f, i);
            FUZZ_ASSERT(t != NULL && t->name != NULL && t->name[0] != '\0', "tensor");
            FUZZ_ASSERT(t->rank <= CCR_ST_MAX_RANK, "rank");
            FUZZ_ASSERT(t->dtype == CCR_DTYPE_F32 || t->dtype == CCR_DTYPE_I32, "dtype");
            size_t numel = ccr_st_tensor_numel(t);
            FUZZ_ASSERT(numel <= size / 4, "numel larger than the file");
            FUZZ_ASSERT(ccr_safetensors_find(f, t->name) == t, "find by name");
            /* Touch every byte: ASan reports a read outside the buffer. */
            const unsigned char *p = t->data;
            for (size_t j = 0; j < 4 * numel; j++)
                bytes += p[j];
        }
        FUZZ_ASSERT(ccr_safetensors_at(f, n) == NULL, "at(count)");
        for (size_t i = 0; i < ccr_safetensors_meta_count(f); i++) {
            const char *k = ccr_safetensors_meta_key(f, i);
            FUZZ_ASSERT(k != NULL && ccr_safetensors_meta(f, k) != NULL, "metadata key");
        }
        (void)bytes;
        ccr_safetensors_free(f);
    } else {
        FUZZ_ASSERT(f == NULL, "*out set on failure");
        FUZZ_ASSERT(s == CCR_EFORMAT || s == CCR_EIO || s == CCR_ENOMEM, "status");
        FUZZ_ASSERT(ccr_ctx_errmsg(ctx)[0] != '\0', "no message");
    }
    ccr_ctx_free(ctx);
    return 0;
}
