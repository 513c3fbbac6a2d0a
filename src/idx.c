/*
 * idx.c - reader for the IDX array format used by MNIST and Fashion-MNIST.
 *
 * An IDX file starts with a four-byte magic number (two zero bytes, the
 * element type, the number of dimensions), then one big-endian uint32 per
 * dimension, then the elements in row-major order, big-endian.  The file is
 * read through zlib, so gzip-compressed and plain files are accepted alike.
 * The header is validated completely before anything large is allocated
 * (known type, 1..CCR_IDX_MAX_DIMS dimensions, no zero dimension, a size that
 * neither overflows nor exceeds a plausibility cap), and the payload must be
 * exactly as long as the dimensions say.  Elements are decoded chunk by chunk
 * straight into the float array, so no second copy of the raw bytes is held.
 *
 * A header cannot make the reader allocate what the file does not hold: a
 * plain file's claimed payload is compared with its size (stat) before the
 * array is allocated, and a gzip file's array grows (doubling) as data
 * arrives, so an 8-byte file claiming gigabytes fails as truncated after
 * allocating a few megabytes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <zlib.h>

#include "ccr/ccr_data.h"
#include "internal.h"

/* Largest payload accepted (bytes): anything bigger is taken as corrupt. */
#define IDX_MAX_BYTES ((uint64_t)4 << 30)

/* First capacity (elements) of a gzip file's array; it doubles as data
 * arrives. */
#define IDX_FIRST_CAP ((size_t)1 << 20)

/* Bytes decoded per read; a multiple of every element size. */
#define IDX_CHUNK ((size_t)1 << 16)

/* Bytes per element of a type, 0 for a type that is not an IDX type. */
static size_t idx_elem_size(unsigned type)
{
    switch (type) {
    case CCR_IDX_U8: return 1;
    case CCR_IDX_I8: return 1;
    case CCR_IDX_I16: return 2;
    case CCR_IDX_I32: return 4;
    case CCR_IDX_F32: return 4;
    case CCR_IDX_F64: return 8;
    default: return 0;
    }
}

static uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) |
           (uint32_t)p[3];
}

static uint64_t be64(const unsigned char *p)
{
    return ((uint64_t)be32(p) << 32) | (uint64_t)be32(p + 4);
}

/* Two's-complement reinterpretation without implementation-defined casts. */
static int64_t as_signed(uint64_t v, unsigned bits)
{
    uint64_t sign = (uint64_t)1 << (bits - 1);
    if (v & sign)
        return -(int64_t)(((~v) & ((sign << 1) - 1)) + 1);
    return (int64_t)v;
}

/* Converts n big-endian elements of the given type to float. */
static void idx_decode(unsigned type, const unsigned char *src, size_t n, float *dst)
{
    switch (type) {
    case CCR_IDX_U8:
        for (size_t i = 0; i < n; i++)
            dst[i] = (float)src[i];
        break;
    case CCR_IDX_I8:
        for (size_t i = 0; i < n; i++)
            dst[i] = (float)as_signed(src[i], 8);
        break;
    case CCR_IDX_I16:
        for (size_t i = 0; i < n; i++) {
            uint64_t v = ((uint64_t)src[2 * i] << 8) | src[2 * i + 1];
            dst[i] = (float)as_signed(v, 16);
        }
        break;
    case CCR_IDX_I32:
        for (size_t i = 0; i < n; i++)
            dst[i] = (float)as_signed(be32(src + 4 * i), 32);
        break;
    case CCR_IDX_F32:
        for (size_t i = 0; i < n; i++) {
            uint32_t bits = be32(src + 4 * i);
            float f;
            memcpy(&f, &bits, sizeof f);
            dst[i] = f;
        }
        break;
    case CCR_IDX_F64:
        for (size_t i = 0; i < n; i++) {
            uint64_t bits = be64(src + 8 * i);
            double d;
            memcpy(&d, &bits, sizeof d);
            dst[i] = (float)d;
        }
        break;
    default:
        break;
    }
}

/* Maps the error state of a zlib stream to a status with a message.  A
 * gzip stream that ends early (Z_BUF_ERROR) is a truncated file. */
static ccr_status idx_gz_error(ccr_ctx *ctx, gzFile f, const char *path)
{
    int errnum = Z_OK;
    const char *msg = gzerror(f, &errnum);
    switch (errnum) {
    case Z_OK:
        return CCR_OK;
    case Z_BUF_ERROR:
        return CCR_FAIL_EXPR(ctx, CCR_EFORMAT, "'%s': truncated gzip stream (%s)", path, msg);
    case Z_DATA_ERROR:
        return CCR_FAIL_EXPR(ctx, CCR_EFORMAT, "'%s': corrupt gzip data (%s)", path, msg);
    case Z_MEM_ERROR:
        return CCR_FAIL_EXPR(ctx, CCR_ENOMEM, "'%s': zlib out of memory", path);
    case Z_ERRNO:
        return CCR_FAIL_EXPR(ctx, CCR_EIO, "'%s': read error: %s", path, strerror(errno));
    default:
        return CCR_FAIL_EXPR(ctx, CCR_EIO, "'%s': read error (%s)", path, msg);
    }
}

/* Reads up to len bytes, looping over short reads; *got is what was read.
 * Stops early only at the end of the data. */
static ccr_status idx_read(ccr_ctx *ctx, gzFile f, const char *path, unsigned char *buf,
                           size_t len, size_t *got)
{
    size_t total = 0;
    while (total < len) {
        size_t want = len - total;
        if (want > ((size_t)1 << 30))
            want = (size_t)1 << 30;
        int r = gzread(f, buf + total, (unsigned)want);
        if (r < 0) {
            ccr_status s = idx_gz_error(ctx, f, path);
            if (s == CCR_OK)
                s = CCR_FAIL_EXPR(ctx, CCR_EIO, "'%s': read error", path);
            return s;
        }
        if (r == 0)
            break;
        total += (size_t)r;
    }
    *got = total;
    if (total < len)
        return idx_gz_error(ctx, f, path);
    return CCR_OK;
}

/* Parses the open file into a new ccr_idx (*out set only on success).
 * file_bytes is the size of the file on disk, or -1 if unknown. */
static ccr_status idx_parse(ccr_ctx *ctx, gzFile f, const char *path, long long file_bytes,
                            ccr_idx **out)
{
    unsigned char head[4 + 4 * CCR_IDX_MAX_DIMS];
    size_t got = 0;
    CCR_TRY(idx_read(ctx, f, path, head, 4, &got));
    if (got < 4)
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': truncated header (%zu of 4 magic bytes)", path, got);
    if (head[0] != 0 || head[1] != 0)
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': bad magic %02x %02x (want 00 00)", path, head[0],
                 head[1]);
    unsigned type = head[2];
    size_t esize = idx_elem_size(type);
    if (esize == 0)
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': unknown element type 0x%02x", path, type);
    size_t ndim = head[3];
    if (ndim < 1 || ndim > CCR_IDX_MAX_DIMS)
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': %zu dimensions (want 1..%d)", path, ndim,
                 CCR_IDX_MAX_DIMS);
    CCR_TRY(idx_read(ctx, f, path, head + 4, 4 * ndim, &got));
    if (got < 4 * ndim)
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': truncated header (%zu of %zu dimension bytes)", path,
                 got, 4 * ndim);

    uint32_t dims[CCR_IDX_MAX_DIMS];
    uint64_t numel = 1;
    for (size_t d = 0; d < ndim; d++) {
        uint32_t v = be32(head + 4 + 4 * d);
        if (v == 0)
            CCR_FAIL(ctx, CCR_EFORMAT, "'%s': dimension %zu is zero", path, d);
        /* numel <= 4 Gi before and v < 4 Gi, so the product fits in 64 bits. */
        numel *= v;
        if (numel > IDX_MAX_BYTES / esize)
            CCR_FAIL(ctx, CCR_EFORMAT, "'%s': implausible size (more than 4 GiB of data)", path);
        dims[d] = v;
    }
    /* Every dimension is <= numel, so each fits in size_t once numel does. */
    size_t n = 0, fbytes = 0;
    if (numel > SIZE_MAX || !ccr_mul_ok((size_t)numel, sizeof(float), &fbytes))
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': size overflows size_t", path);
    n = (size_t)numel;
    /* A plain file must hold what its header claims: checked before the
     * array is allocated.  (numel * esize <= 4 GiB, no overflow.) */
    uint64_t header_bytes = 4 + 4 * (uint64_t)ndim, payload = numel * esize;
    if (gzdirect(f) && file_bytes >= 0 &&
        (uint64_t)file_bytes != header_bytes + payload)
        CCR_FAIL(ctx, CCR_EFORMAT,
                 "'%s': header claims %llu bytes of data, the file holds %lld after the "
                 "%llu-byte header", path, (unsigned long long)payload,
                 file_bytes - (long long)header_bytes, (unsigned long long)header_bytes);
    CCR_TRY(ccr_mem_check(ctx, fbytes, "IDX array"));
    /* gzip: grow as data arrives; plain: the size is known to be right. */
    size_t cap = gzdirect(f) || n <= IDX_FIRST_CAP ? n : IDX_FIRST_CAP;

    ccr_idx *idx = calloc(1, sizeof *idx);
    float *data = ccr_mallocn(cap, sizeof *data);
    unsigned char *chunk = malloc(IDX_CHUNK);
    ccr_status s = CCR_OK;
    if (idx == NULL || data == NULL || chunk == NULL) {
        s = CCR_FAIL_EXPR(ctx, CCR_ENOMEM, "'%s': cannot allocate %zu floats", path, cap);
        goto fail;
    }

    size_t done = 0;  /* elements decoded */
    while (done < n) {
        size_t take = n - done;
        if (take > IDX_CHUNK / esize)
            take = IDX_CHUNK / esize;
        if (done + take > cap) {  /* cap < n <= 2^32: doubling cannot overflow */
            size_t grown = cap * 2 < n ? cap * 2 : n;
            float *more = ccr_reallocn(data, grown, sizeof *data);
            if (more == NULL) {
                s = CCR_FAIL_EXPR(ctx, CCR_ENOMEM, "'%s': cannot allocate %zu floats", path,
                                  grown);
                goto fail;
            }
            data = more;
            cap = grown;
        }
        s = idx_read(ctx, f, path, chunk, take * esize, &got);
        if (s != CCR_OK)
            goto fail;
        if (got < take * esize) {
            s = CCR_FAIL_EXPR(ctx, CCR_EFORMAT,
                              "'%s': truncated data (%zu of %zu elements present)", path,
                              done + got / esize, n);
            goto fail;
        }
        idx_decode(type, chunk, take, data + done);
        done += take;
    }
    /* The payload must end exactly here. */
    s = idx_read(ctx, f, path, chunk, 1, &got);
    if (s != CCR_OK)
        goto fail;
    if (got != 0) {
        s = CCR_FAIL_EXPR(ctx, CCR_EFORMAT, "'%s': trailing bytes after %zu elements", path, n);
        goto fail;
    }

    free(chunk);
    idx->type = (ccr_idx_type)type;
    idx->ndim = ndim;
    for (size_t d = 0; d < ndim; d++)
        idx->dims[d] = (size_t)dims[d];
    idx->numel = n;
    idx->data = data;
    *out = idx;
    return CCR_OK;

fail:
    free(chunk);
    free(data);
    free(idx);
    return s;
}

ccr_status ccr_idx_load(ccr_ctx *ctx, const char *path, ccr_idx **out)
{
    CCR_CHECK_NULL(ctx, path);
    CCR_CHECK_NULL(ctx, out);
    errno = 0;
    gzFile f = gzopen(path, "rb");
    if (f == NULL)
        CCR_FAIL(ctx, CCR_EIO, "cannot open '%s': %s", path,
                 errno != 0 ? strerror(errno) : "out of memory");
    gzbuffer(f, 1u << 17);
    struct stat st;
    long long file_bytes = stat(path, &st) == 0 && S_ISREG(st.st_mode) ? (long long)st.st_size
                                                                       : -1;
    ccr_idx *idx = NULL;
    ccr_status s = idx_parse(ctx, f, path, file_bytes, &idx);
    gzclose(f);
    if (s == CCR_OK)
        *out = idx;
    return s;
}

void ccr_idx_free(ccr_idx *idx)
{
    if (idx == NULL)
        return;
    free(idx->data);
    free(idx);
}
