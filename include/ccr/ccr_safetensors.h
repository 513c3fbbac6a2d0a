/*
 * ccr_safetensors.h - named tensors in the safetensors format.
 *
 * The file layout (the format PyTorch users exchange weights in):
 *   8 bytes   N, the header length, unsigned little-endian 64-bit
 *   N bytes   a JSON object: "name": {"dtype": "F32"|"I32", "shape": [...],
 *             "data_offsets": [begin, end]} per tensor, plus an optional
 *             "__metadata__": {"key": "string value", ...}
 *   rest      raw little-endian tensor data; offsets are relative to the
 *             first byte after the header.
 * ccr writes tensors in the order given, contiguous, and pads the header with
 * spaces to a multiple of 8 bytes, as the reference implementation does.
 *
 *     ccr_st_tensor t[2] = {
 *         {.name = "x", .dtype = CCR_DTYPE_F32, .rank = 2, .shape = {4, 3}, .data = x},
 *         {.name = "ids", .dtype = CCR_DTYPE_I32, .rank = 1, .shape = {4}, .data = ids},
 *     };
 *     const char *meta[] = {"gate", "topk", "k", "2"};
 *     ccr_safetensors_write(ctx, "probe.safetensors", t, 2, meta, 2);
 *
 *     ccr_safetensors *f;
 *     ccr_safetensors_read(ctx, "probe.safetensors", &f);
 *     const ccr_st_tensor *x = ccr_safetensors_find(f, "x");   // NULL if absent
 *     const char *gate = ccr_safetensors_meta(f, "gate");       // NULL if absent
 *     ccr_safetensors_free(f);
 */
#ifndef CCR_SAFETENSORS_H
#define CCR_SAFETENSORS_H

#include "ccr_common.h"
#include "ccr_ctx.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

#define CCR_ST_MAX_RANK 8
/* Largest header ccr accepts when reading (the reference reader's limit). */
#define CCR_ST_MAX_HEADER (100u * 1000u * 1000u)

typedef enum ccr_dtype {
    CCR_DTYPE_F32 = 0,  /* "F32": IEEE float, 4 bytes */
    CCR_DTYPE_I32 = 1   /* "I32": two's complement int32, 4 bytes */
} ccr_dtype;

typedef struct ccr_st_tensor {
    const char *name;              /* unique, non-empty, not "__metadata__" */
    ccr_dtype dtype;
    size_t rank;                   /* 0..CCR_ST_MAX_RANK; rank 0 is a scalar */
    size_t shape[CCR_ST_MAX_RANK];
    const void *data;              /* product(shape) elements, host memory */
} ccr_st_tensor;

typedef struct ccr_safetensors ccr_safetensors;

/* Writes n tensors and n_meta metadata pairs (meta[2i] key, meta[2i+1]
 * value; both strings) to path, replacing it.  The file is written to a
 * temporary beside path ("<path>.ccr-tmp.<pid>.<n>"), fsynced, renamed into
 * place and the directory fsynced, so a failed write leaves the previous
 * file as it was and no temporary (a killed process's temporary carries its
 * pid; the drivers remove such leftovers at their next run).  A path that
 * is a device (/dev/null) is written in place.  Returns CCR_EINVAL (NULL, empty or duplicate
 * names, bad rank, NULL data with non-zero size, duplicate metadata keys,
 * strings that are not UTF-8, more than 2^53 bytes), CCR_EIO (cannot write),
 * CCR_ENOMEM. */
ccr_status ccr_safetensors_write(ccr_ctx *ctx, const char *path,
                                 const ccr_st_tensor *tensors, size_t n,
                                 const char *const *meta, size_t n_meta);

/* Reads a whole file into memory and validates it: header length within the
 * file and <= CCR_ST_MAX_HEADER, header valid JSON object, every entry with a
 * known dtype (F32, I32), a shape of non-negative integers whose product times
 * the dtype size equals end - begin, offsets in range, non-overlapping and
 * covering the data section, metadata values strings.  Returns CCR_EIO if the
 * file cannot be read and CCR_EFORMAT for any malformation (the message says
 * which); *out is set only on success. */
ccr_status ccr_safetensors_read(ccr_ctx *ctx, const char *path, ccr_safetensors **out);

/* Releases a file read with ccr_safetensors_read.  NULL is accepted. */
void ccr_safetensors_free(ccr_safetensors *f);

/* Number of tensors, and tensor i in file order (data points into memory
 * owned by f; 4-byte aligned). */
size_t ccr_safetensors_count(const ccr_safetensors *f);
const ccr_st_tensor *ccr_safetensors_at(const ccr_safetensors *f, size_t i);

/* The tensor with this name, or NULL. */
const ccr_st_tensor *ccr_safetensors_find(const ccr_safetensors *f, const char *name);

/* The metadata value for key, or NULL; the number of metadata pairs and the
 * i-th key. */
const char *ccr_safetensors_meta(const ccr_safetensors *f, const char *key);
size_t ccr_safetensors_meta_count(const ccr_safetensors *f);
const char *ccr_safetensors_meta_key(const ccr_safetensors *f, size_t i);

/* Number of elements of a tensor (1 for rank 0; SIZE_MAX if the product
 * overflows). */
size_t ccr_st_tensor_numel(const ccr_st_tensor *t);

CCR_END_DECLS

#endif /* CCR_SAFETENSORS_H */
