/*
 * fuzz_idx.c - the IDX loaders on arbitrary bytes: ccr_idx_load on the whole
 * input, and ccr_dataset_load_idx on the input cut in two: bytes 1..1+b are
 * the image file, b = byte 0 (capped at the input), the rest the label file.
 * Files are plain or gzip (zlib reads both).  An accepted file's numel
 * matches its dims; an accepted data set's labels are in range and its
 * features finite.
 */
#include <math.h>

#include "ccr/ccr.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ccr_ctx *ctx = NULL;
    if (ccr_ctx_init(&ctx) != CCR_OK)
        return 0;
    const char *path = fuzz_file(0, data, size);
    ccr_idx *idx = NULL;
    if (path != NULL && ccr_idx_load(ctx, path, &idx) == CCR_OK) {
        size_t n = 1;
        for (size_t d = 0; d < idx->ndim; d++)
            n *= idx->dims[d];
        FUZZ_ASSERT(n == idx->numel, "numel != product of dims");
        /* A plain file (not gzip) holds at least a byte per element. */
        FUZZ_ASSERT(data[0] != 0 || idx->numel <= size, "more elements than input bytes");
        ccr_idx_free(idx);
    }
    if (size >= 1) {
        size_t cut = 1 + (size - 1 < data[0] ? size - 1 : data[0]);
        const char *images = fuzz_file(1, data + 1, cut - 1);
        const char *labels = fuzz_file(2, data + cut, size - cut);
        ccr_dataset *ds = NULL;
        if (images && labels && ccr_dataset_load_idx(ctx, images, labels, &ds) == CCR_OK) {
            FUZZ_ASSERT(ds->n > 0 && ds->dim > 0, "empty data set");
            for (size_t i = 0; i < ds->n; i++)
                FUZZ_ASSERT(ds->y[i] >= 0 && (size_t)ds->y[i] < ds->n_classes, "label range");
            for (size_t i = 0; i < ds->n * ds->dim; i++)
                FUZZ_ASSERT(isfinite(ds->x[i]), "non-finite feature in a data set");
            ccr_dataset_free(ds);
        }
    }
    ccr_ctx_free(ctx);
    return 0;
}
