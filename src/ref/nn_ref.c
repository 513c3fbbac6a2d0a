/*
 * nn_ref.c - reference kernels of the dense layers and the loss: bias
 * add/grad, element-wise activations, softmax cross-entropy.
 *
 * The softmax is the numerically stable form (subtract the row maximum); the
 * loss uses log-sum-exp in double.  Activation derivatives are written in
 * terms of the layer's output so that the backward pass needs no copy of the
 * pre-activation.
 *
 * Gradient entries below FLT_MIN in magnitude are written as 0: once a
 * network fits its data, the softmax of the wrong classes underflows, and
 * subnormal gradients fed to the backward GEMMs make every multiply ~100x
 * slower on x86 (measured: a training step 2-4x slower after a few thousand
 * steps).  Such entries cannot change any parameter in float anyway.
 */
#include <float.h>
#include <math.h>
#include <stdbool.h>

#include "ref/ref.h"

void ccr_ref_bias_add(float *y, const float *bias, size_t rows, size_t cols)
{
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++)
            y[r * cols + c] += bias[c];
}

void ccr_ref_bias_grad(float *db, const float *dy, size_t rows, size_t cols)
{
    for (size_t c = 0; c < cols; c++) {
        double acc = 0.0;
        for (size_t r = 0; r < rows; r++)
            acc += dy[r * cols + c];
        db[c] += (float)acc;
    }
}

void ccr_ref_act_fwd(ccr_act act, const float *x, float *y, size_t n)
{
    switch (act) {
    case CCR_ACT_RELU:
        for (size_t i = 0; i < n; i++)
            y[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
    case CCR_ACT_TANH:
        for (size_t i = 0; i < n; i++)
            y[i] = tanhf(x[i]);
        break;
    case CCR_ACT_SIGMOID:
        /* 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) otherwise: no overflow. */
        for (size_t i = 0; i < n; i++) {
            if (x[i] >= 0.0f) {
                y[i] = 1.0f / (1.0f + expf(-x[i]));
            } else {
                float e = expf(x[i]);
                y[i] = e / (1.0f + e);
            }
        }
        break;
    case CCR_ACT_IDENTITY:
    default:
        for (size_t i = 0; i < n; i++)
            y[i] = x[i];
        break;
    }
}

void ccr_ref_act_bwd(ccr_act act, const float *y, const float *dy, float *dx, size_t n)
{
    switch (act) {
    case CCR_ACT_RELU:
        for (size_t i = 0; i < n; i++)
            dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
        break;
    case CCR_ACT_TANH:
        for (size_t i = 0; i < n; i++)
            dx[i] = dy[i] * (1.0f - y[i] * y[i]);
        break;
    case CCR_ACT_SIGMOID:
        for (size_t i = 0; i < n; i++)
            dx[i] = dy[i] * y[i] * (1.0f - y[i]);
        break;
    case CCR_ACT_IDENTITY:
    default:
        for (size_t i = 0; i < n; i++)
            dx[i] = dy[i];
        break;
    }
}

void ccr_ref_softmax_xent(const float *logits, const int32_t *labels, size_t rows,
                          size_t cols, float scale, float *loss, int32_t *correct,
                          float *dlogits)
{
    for (size_t r = 0; r < rows; r++) {
        const float *z = logits + r * cols;
        size_t arg = 0;
        float zmax = z[0];
        for (size_t c = 1; c < cols; c++) {
            if (z[c] > zmax) {
                zmax = z[c];
                arg = c;
            }
        }
        double sum = 0.0;
        for (size_t c = 0; c < cols; c++)
            sum += exp((double)z[c] - (double)zmax);
        size_t y = (size_t)labels[r];
        double lse = (double)zmax + log(sum);
        loss[r] = (float)(lse - (double)z[y]);
        /* A row with NaN or infinity predicts nothing (NaN compares false,
         * so the argmax would otherwise fall on class 0). */
        bool finite = true;
        for (size_t c = 0; c < cols; c++)
            finite = finite && isfinite(z[c]);
        correct[r] = arg == y && finite;
        if (dlogits != NULL) {
            float *d = dlogits + r * cols;
            for (size_t c = 0; c < cols; c++) {
                double p = exp((double)z[c] - lse);
                float g = (float)((double)scale * (p - (c == y ? 1.0 : 0.0)));
                d[c] = fabsf(g) < FLT_MIN ? 0.0f : g;
            }
        }
    }
}
