/*
 * optim_ref.c - reference optimiser updates: SGD with momentum (PyTorch's
 * convention, momentum buffer of raw gradients) and Adam with bias
 * correction (Kingma & Ba 2015, Algorithm 1), both with optional L2 weight
 * decay added to the gradient.
 */
#include <math.h>

#include "ref/ref.h"

void ccr_ref_sgd_step(float *w, const float *g, float *v, size_t n, float lr, float mu,
                      float wd)
{
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] + wd * w[i];
        if (mu != 0.0f) {
            v[i] = mu * v[i] + gi;
            gi = v[i];
        }
        w[i] -= lr * gi;
    }
}

void ccr_ref_adam_step(float *w, const float *g, float *m, float *v, size_t n, float lr,
                       float b1, float b2, float eps, float wd, uint64_t t)
{
    double c1 = 1.0 - pow((double)b1, (double)t);
    double c2 = 1.0 - pow((double)b2, (double)t);
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] + wd * w[i];
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        double mhat = m[i] / c1, vhat = v[i] / c2;
        w[i] -= (float)((double)lr * mhat / (sqrt(vhat) + (double)eps));
    }
}
