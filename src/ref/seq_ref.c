/*
 * seq_ref.c - reference kernels of the sequence models (the LSTM language
 * model of experiments/lm_model.c): element-wise product and sum, row gather
 * and segmented row sums (an embedding and its gradient), one LSTM timestep
 * forward and backward, and the full softmax with its negative
 * log-likelihood.
 *
 * The softmax row is the one the language model has always used: the
 * maximum and the sums over fixed lanes and blocks (the same order on every
 * call, loops the compiler vectorises) and exp by a Cephes polynomial for
 * arguments <= 0, clamped at ln(2^-126) so that no probability is
 * subnormal (subnormals slow every later multiply ~100x on x86).
 */
#include <math.h>
#include <stdint.h>

#include "ref/ref.h"

void ccr_ref_scale(float *x, size_t n, float k)
{
    for (size_t i = 0; i < n; i++)
        x[i] *= k;
}

void ccr_ref_mul(const float *a, const float *b, float *y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] * b[i];
}

void ccr_ref_add(const float *a, const float *b, float *y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}

void ccr_ref_gather_rows(const float *table, size_t d, const int32_t *ids, size_t n, float *out)
{
    for (size_t r = 0; r < n; r++)
        for (size_t j = 0; j < d; j++)
            out[r * d + j] = table[(size_t)ids[r] * d + j];
}

void ccr_ref_segment_add_rows(float *dst, size_t d, const float *src, const int32_t *rows,
                              const int32_t *start, const int32_t *seg_dst, size_t n_seg)
{
    for (size_t s = 0; s < n_seg; s++) {
        float *o = dst + (size_t)seg_dst[s] * d;
        for (size_t j = 0; j < d; j++) {
            float acc = o[j];
            for (int32_t p = start[s]; p < start[s + 1]; p++)
                acc += src[(size_t)rows[p] * d + j];
            o[j] = acc;
        }
    }
}

static float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

void ccr_ref_lstm_fwd(float *z, const float *c_prev, float *c, float *tc, float *h, size_t batch,
                      size_t d)
{
    for (size_t b = 0; b < batch; b++) {
        float *zb = z + b * 4 * d;
        for (size_t j = 0; j < d; j++) {
            size_t q = b * d + j;
            float i = sigm(zb[j]), f = sigm(zb[d + j]), g = tanhf(zb[2 * d + j]);
            float o = sigm(zb[3 * d + j]);
            zb[j] = i, zb[d + j] = f, zb[2 * d + j] = g, zb[3 * d + j] = o;
            float cv = f * c_prev[q] + i * g, t = tanhf(cv);
            c[q] = cv;
            tc[q] = t;
            h[q] = o * t;
        }
    }
}

void ccr_ref_lstm_bwd(const float *z, const float *c_prev, const float *tc, const float *dh_out,
                      const float *dh_rec, float *dc, float *dz, size_t batch, size_t d)
{
    for (size_t b = 0; b < batch; b++) {
        const float *zb = z + b * 4 * d;
        float *db = dz + b * 4 * d;
        for (size_t j = 0; j < d; j++) {
            size_t q = b * d + j;
            float i = zb[j], f = zb[d + j], g = zb[2 * d + j], o = zb[3 * d + j];
            float t = tc[q], dh = dh_out[q] + dh_rec[q];
            float dcv = dc[q] + dh * o * (1.0f - t * t);
            db[j] = dcv * g * i * (1.0f - i);
            db[d + j] = dcv * c_prev[q] * f * (1.0f - f);
            db[2 * d + j] = dcv * i * (1.0f - g * g);
            db[3 * d + j] = dh * t * o * (1.0f - o);
            dc[q] = dcv * f;
        }
    }
}

/* exp(x) for x <= 0 as plain arithmetic the compiler vectorises: x = n ln 2
 * + r with |r| <= ln2/2 (two-part ln 2), e^r by Cephes expf's degree-6
 * polynomial, 2^n put into the exponent bits.  Relative error about 2e-7;
 * x below ln(2^-126) is clamped there.  NaN stays NaN. */
static inline float exp_nonpos(float x)
{
    const float lo = -87.33654f, log2e = 1.44269504089f, shifter = 12582912.0f;  /* 1.5*2^23 */
    x = x < lo ? lo : x;
    float n = (x * log2e + shifter) - shifter;  /* round to nearest, |n| <= 126 */
    float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  /* NaN stays in r */
    n = n == n ? n : 0.0f;  /* no float-to-int conversion of a NaN */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

double ccr_ref_softmax_row(float *z, size_t n)
{
    enum { L = 8, BLOCK = 512 };
    size_t nv = n - n % L;
    float mx8[L];
    for (size_t l = 0; l < L; l++)
        mx8[l] = z[0];
    for (size_t j = 0; j < nv; j += L)
        for (size_t l = 0; l < L; l++)
            mx8[l] = z[j + l] > mx8[l] ? z[j + l] : mx8[l];
    float mx = z[0];
    for (size_t l = 0; l < L; l++)
        mx = mx8[l] > mx ? mx8[l] : mx;
    for (size_t j = nv; j < n; j++)
        mx = z[j] > mx ? z[j] : mx;
    for (size_t j = 0; j < n; j++)
        z[j] = exp_nonpos(z[j] - mx);
    double sum = 0.0;  /* float lanes within a block, double across blocks */
    for (size_t j0 = 0; j0 < n; j0 += BLOCK) {
        size_t j1 = n - j0 < BLOCK ? n : j0 + BLOCK, jv = j1 - (j1 - j0) % L;
        float s8[L] = {0.0f};
        for (size_t j = j0; j < jv; j += L)
            for (size_t l = 0; l < L; l++)
                s8[l] += z[j + l];
        float bs = 0.0f;
        for (size_t l = 0; l < L; l++)
            bs += s8[l];
        for (size_t j = jv; j < j1; j++)
            bs += z[j];
        sum += (double)bs;
    }
    float inv = (float)(1.0 / sum);
    for (size_t j = 0; j < n; j++)
        z[j] *= inv;
    return log(sum) + (double)mx;
}

void ccr_ref_softmax_nll(float *z, const int32_t *tgt, size_t rows, size_t cols, double *nll)
{
    for (size_t r = 0; r < rows; r++) {
        float *zr = z + r * cols;
        double zt = tgt[r] >= 0 ? (double)zr[tgt[r]] : 0.0;
        double lse = ccr_ref_softmax_row(zr, cols);
        nll[r] = tgt[r] >= 0 ? lse - zt : 0.0;
    }
}

void ccr_ref_softmax_nll_bwd(float *z, const int32_t *tgt, size_t rows, size_t cols, float scale)
{
    for (size_t r = 0; r < rows; r++) {
        float *zr = z + r * cols;
        if (tgt[r] < 0) {
            for (size_t j = 0; j < cols; j++)
                zr[j] = 0.0f;
            continue;
        }
        zr[tgt[r]] -= 1.0f;
        for (size_t j = 0; j < cols; j++)
            zr[j] *= scale;
    }
}
