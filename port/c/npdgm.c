/* npdgm.c: npdgm's kernels as plain C99 (float64, libc + libm), in llm.c's habit: each forward beside its
 * backward, written out in loops, with the Python kernel's docstring as the comment above it. Then Adam and a
 * VAE training step built only from these functions.
 *
 * Conventions (docs/checkpoints.md, npdgm/kernels/table.py): arrays are row-major; a Linear layer's W is
 * (in, out) and computes y = x @ W + b; a backward takes the upstream gradient of every output and writes the
 * gradients of the inputs (it never accumulates into them). Randomness is an argument (eps). */
#include "npdgm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

static const double LOG_2PI = 1.8378770664093453;  /* log(2 pi) */
static const double PI = 3.14159265358979323846;

/* a zeroed block of n doubles (exits on out of memory: the kernels have no error path) */
static double *scratch(size_t n) {
    double *p = calloc(n ? n : 1, sizeof(double));
    if (!p) { fprintf(stderr, "npdgm-c: error: out of memory\n"); exit(2); }
    return p;
}

/* ================================================================================================
 * linear
 * ================================================================================================ */

/* y = x @ W + b.   x: (B, in), W: (in, out), b: (out,) -> y: (B, out). */
void linear_forward(const double *x, const double *W, const double *b, double *y, int B, int in, int out) {
    for (int r = 0; r < B; r++) {
        double *yr = y + (size_t)r * out;
        for (int o = 0; o < out; o++) yr[o] = 0.0;
        for (int i = 0; i < in; i++) {
            double xi = x[(size_t)r * in + i];
            const double *Wi = W + (size_t)i * out;
            for (int o = 0; o < out; o++) yr[o] += xi * Wi[o];
        }
        for (int o = 0; o < out; o++) yr[o] += b[o];
    }
}

/* Gradients of y = x @ W + b.
 *   dx = dy @ W.T      (B, in)
 *   dW = x.T @ dy      (in, out)
 *   db = sum_B dy      (out,)
 * dx may be NULL (the first layer needs no input gradient). */
void linear_backward(const double *dy, const double *x, const double *W, double *dx, double *dW, double *db,
                     int B, int in, int out) {
    if (dx) {
        for (int r = 0; r < B; r++)
            for (int i = 0; i < in; i++) {
                const double *Wi = W + (size_t)i * out, *dyr = dy + (size_t)r * out;
                double acc = 0.0;
                for (int o = 0; o < out; o++) acc += dyr[o] * Wi[o];
                dx[(size_t)r * in + i] = acc;
            }
    }
    memset(dW, 0, sizeof(double) * (size_t)in * out);
    memset(db, 0, sizeof(double) * (size_t)out);
    for (int r = 0; r < B; r++) {
        const double *dyr = dy + (size_t)r * out;
        for (int i = 0; i < in; i++) {
            double xi = x[(size_t)r * in + i];
            double *dWi = dW + (size_t)i * out;
            for (int o = 0; o < out; o++) dWi[o] += xi * dyr[o];
        }
        for (int o = 0; o < out; o++) db[o] += dyr[o];
    }
}

/* y = x (W * M) + b.   x (B, in), W and the fixed 0/1 mask M (in, out), b (out,) -> y (B, out). */
void masked_linear_forward(const double *x, const double *W, const double *M, const double *b, double *y,
                           int B, int in, int out) {
    size_t n = (size_t)in * out;
    double *WM = scratch(n);
    for (size_t k = 0; k < n; k++) WM[k] = W[k] * M[k];
    linear_forward(x, WM, b, y, B, in, out);
    free(WM);
}

/* dx = dy (W * M)^T,  dW = (x^T dy) * M (a masked-out weight gets no gradient),  db = sum_B dy. */
void masked_linear_backward(const double *dy, const double *x, const double *W, const double *M, double *dx,
                            double *dW, double *db, int B, int in, int out) {
    size_t n = (size_t)in * out;
    double *WM = scratch(n);
    for (size_t k = 0; k < n; k++) WM[k] = W[k] * M[k];
    linear_backward(dy, x, WM, dx, dW, db, B, in, out);
    for (size_t k = 0; k < n; k++) dW[k] *= M[k];
    free(WM);
}

/* ================================================================================================
 * activations: forward y = f(x), backward dx = dy * f'(x)
 * ================================================================================================ */

const char *const ACTIVATION_NAMES[ACT_COUNT] = {"identity", "relu", "leaky_relu", "tanh", "sigmoid",
                                                 "softplus", "elu"};

int activation_by_name(const char *name) {
    for (int a = 0; a < ACT_COUNT; a++)
        if (strcmp(name, ACTIVATION_NAMES[a]) == 0) return a;
    return -1;
}

/* y = 1 / (1 + exp(-x)) = n / (1 + e),  e = exp(-|x|),  n = exp(min(x, 0)) = (1 if x >= 0 else e):
 * the exponent is <= 0, so no overflow for large |x| and no cancellation in either tail. */
double sigmoid(double x) {
    double e = exp(-fabs(x));
    return (x >= 0 ? 1.0 : e) / (1.0 + e);
}

/* y = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))   (stable for all x). */
double softplus(double x) { return log1p(exp(-fabs(x))) + (x > 0 ? x : 0.0); }

static const double LEAKY_SLOPE = 0.01, ELU_ALPHA = 1.0;

/* identity:   y = x.
 * relu:       y = max(x, 0).
 * leaky_relu: y = x if x > 0 else slope * x   (slope 0.01).
 * tanh:       y = tanh(x).
 * sigmoid:    y = 1 / (1 + exp(-x))   (the stable form above).
 * softplus:   y = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)).
 * elu:        y = x if x > 0 else alpha * (exp(x) - 1)   (alpha 1). */
void activation_forward(Activation a, const double *x, double *y, size_t n) {
    for (size_t k = 0; k < n; k++) {
        double v = x[k];
        switch (a) {
        case ACT_IDENTITY: y[k] = v; break;
        case ACT_RELU: y[k] = v > 0 ? v : 0.0; break;
        case ACT_LEAKY_RELU: y[k] = v > 0 ? v : v * LEAKY_SLOPE; break;
        case ACT_TANH: y[k] = tanh(v); break;
        case ACT_SIGMOID: y[k] = sigmoid(v); break;
        case ACT_SOFTPLUS: y[k] = softplus(v); break;
        case ACT_ELU: y[k] = v > 0 ? v : ELU_ALPHA * expm1(v); break;
        default: y[k] = NAN;
        }
    }
}

/* identity:   dx = dy.
 * relu:       dx = dy * [x > 0]   (computed from y = relu(x): y > 0 iff x > 0; f'(0) := 0).
 * leaky_relu: dx = dy * (1 if x > 0 else slope).
 * tanh:       dx = dy * (1 - y^2),  y = tanh(x).
 * sigmoid:    dx = dy * y * (1 - y),  y = sigmoid(x).
 * softplus:   dx = dy * sigmoid(x).
 * elu:        dx = dy * (1 if x > 0 else alpha * exp(x)). */
void activation_backward(Activation a, const double *dy, const double *x, const double *y, double *dx,
                         size_t n) {
    for (size_t k = 0; k < n; k++) {
        double g = dy[k];
        switch (a) {
        case ACT_IDENTITY: dx[k] = g; break;
        case ACT_RELU: dx[k] = y[k] > 0 ? g : 0.0; break;
        case ACT_LEAKY_RELU: dx[k] = x[k] > 0 ? g : g * LEAKY_SLOPE; break;
        case ACT_TANH: dx[k] = g * (1 - y[k] * y[k]); break;
        case ACT_SIGMOID: dx[k] = g * y[k] * (1 - y[k]); break;
        case ACT_SOFTPLUS: dx[k] = g * sigmoid(x[k]); break;
        case ACT_ELU: dx[k] = x[k] > 0 ? g : g * ELU_ALPHA * exp(x[k]); break;
        default: dx[k] = NAN;
        }
    }
}

/* ================================================================================================
 * losses: one number per row, summed over the feature axis; callers average over the batch
 * ================================================================================================ */

/* -log Bernoulli(x | sigmoid(l)) summed over features = sum_d softplus(l) - x * l.
 * logits, x: (B, D) with x in [0, 1] -> (B,). Stable for any |l| (the BCE-with-logits form). */
void bernoulli_nll_forward(const double *logits, const double *x, double *loss, int B, int D) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            acc += softplus(logits[k]) - x[k] * logits[k];
        }
        loss[r] = acc;
    }
}

/* dl = dloss[:, None] * (sigmoid(l) - x). */
void bernoulli_nll_backward(const double *dloss, const double *logits, const double *x, double *dl, int B, int D) {
    for (int r = 0; r < B; r++)
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            dl[k] = dloss[r] * (sigmoid(logits[k]) - x[k]);
        }
}

/* logvar's element for (row r, column d): a scalar, per dimension (D,) or per element (B, D). */
static double logvar_at(const double *logvar, size_t lv_n, int r, int d, int D) {
    return lv_n == 1 ? logvar[0] : lv_n == (size_t)D ? logvar[d] : logvar[(size_t)r * D + d];
}

/* loss_b = -log N(x_b | mu_b, exp(logvar)) = 0.5 * sum_d [ (x - mu)^2 exp(-logvar) + logvar + log 2 pi ].
 * mu, x: (B, D); logvar: scalar, (D,) (learned per dimension) or (B, D) -> (B,). */
void gaussian_nll_forward(const double *mu, const double *x, const double *logvar, size_t lv_n, double *loss,
                          int B, int D) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            double res = x[k] - mu[k], lv = logvar_at(logvar, lv_n, r, d, D);
            acc += res * res * exp(-lv) + lv + LOG_2PI;
        }
        loss[r] = 0.5 * acc;
    }
}

/* Gradients of the Gaussian NLL per row:
 *   dmu     = dloss * (mu - x) exp(-logvar)
 *   dlogvar = dloss * 0.5 * (1 - (x - mu)^2 exp(-logvar))   (summed to logvar's shape) */
void gaussian_nll_backward(const double *dloss, const double *mu, const double *x, const double *logvar,
                           size_t lv_n, double *dmu, double *dlogvar, int B, int D) {
    memset(dlogvar, 0, sizeof(double) * lv_n);
    for (int r = 0; r < B; r++)
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            double res = x[k] - mu[k], prec = exp(-logvar_at(logvar, lv_n, r, d, D));
            dmu[k] = -dloss[r] * res * prec;
            double g = dloss[r] * 0.5 * (1 - res * res * prec);
            if (lv_n == 1) dlogvar[0] += g;
            else if (lv_n == (size_t)D) dlogvar[d] += g;
            else dlogvar[k] = g;
        }
}

/* mean over all elements of (pred - target)^2 -> scalar. */
double mse_forward(const double *pred, const double *target, size_t n) {
    double acc = 0.0;
    for (size_t k = 0; k < n; k++) acc += (pred[k] - target[k]) * (pred[k] - target[k]);
    return acc / (double)n;
}

/* dpred = dloss * 2 (pred - target) / N. */
void mse_backward(double dloss, const double *pred, const double *target, double *dpred, size_t n) {
    for (size_t k = 0; k < n; k++) dpred[k] = dloss * 2 * (pred[k] - target[k]) / (double)n;
}

/* y = log sum_i exp(a_i) along the last axis = m + log sum exp(a - m), m = max a (stable). a (B, C) -> (B,). */
void logsumexp_forward(const double *a, double *y, int B, int C) {
    for (int r = 0; r < B; r++) {
        const double *ar = a + (size_t)r * C;
        double m = -INFINITY, acc = 0.0;
        for (int c = 0; c < C; c++) m = ar[c] > m ? ar[c] : m;
        if (!isfinite(m)) m = 0.0;
        for (int c = 0; c < C; c++) acc += exp(ar[c] - m);
        y[r] = m + log(acc);
    }
}

/* da = dy * softmax(a) = dy * exp(a - y). */
void logsumexp_backward(const double *dy, const double *a, const double *y, double *da, int B, int C) {
    for (int r = 0; r < B; r++)
        for (int c = 0; c < C; c++) da[(size_t)r * C + c] = dy[r] * exp(a[(size_t)r * C + c] - y[r]);
}

/* ================================================================================================
 * Gaussian q(z|x) = N(mu, exp(logvar)): reparameterization and KL to N(0, I)
 * ================================================================================================ */

/* z = mu + exp(logvar / 2) * eps.   mu, logvar: (B, Z), eps: (K, B, Z) (K = 1: one sample); BZ = B * Z. */
void reparameterize_forward(const double *mu, const double *logvar, const double *eps, double *z, int K, int BZ) {
    for (int s = 0; s < K; s++)
        for (int k = 0; k < BZ; k++) z[(size_t)s * BZ + k] = mu[k] + exp(0.5 * logvar[k]) * eps[(size_t)s * BZ + k];
}

/* dmu = dz,  dlogvar = dz * eps * exp(logvar / 2) / 2   (summed over leading sample axes). */
void reparameterize_backward(const double *dz, const double *logvar, const double *eps, double *dmu,
                             double *dlogvar, int K, int BZ) {
    for (int k = 0; k < BZ; k++) {
        double gm = 0.0, gl = 0.0, half_sigma = 0.5 * exp(0.5 * logvar[k]);
        for (int s = 0; s < K; s++) {
            size_t i = (size_t)s * BZ + k;
            gm += dz[i];
            gl += dz[i] * eps[i] * half_sigma;
        }
        dmu[k] = gm;
        dlogvar[k] = gl;
    }
}

/* KL(N(mu, exp(logvar)) || N(0, I)) per row = 0.5 * sum_j (mu^2 + exp(logvar) - 1 - logvar) -> (B,). */
void kl_std_normal_forward(const double *mu, const double *logvar, double *kl, int B, int Z) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int j = 0; j < Z; j++) {
            size_t k = (size_t)r * Z + j;
            acc += mu[k] * mu[k] + exp(logvar[k]) - 1 - logvar[k];
        }
        kl[r] = 0.5 * acc;
    }
}

/* dmu = dkl * mu,  dlogvar = dkl * (exp(logvar) - 1) / 2. */
void kl_std_normal_backward(const double *dkl, const double *mu, const double *logvar, double *dmu,
                            double *dlogvar, int B, int Z) {
    for (int r = 0; r < B; r++)
        for (int j = 0; j < Z; j++) {
            size_t k = (size_t)r * Z + j;
            dmu[k] = dkl[r] * mu[k];
            dlogvar[k] = dkl[r] * 0.5 * (exp(logvar[k]) - 1);
        }
}

/* mean_b KL_bj for column j */
static double kl_column_mean(const double *mu, const double *logvar, int B, int Z, int j) {
    double acc = 0.0;
    for (int r = 0; r < B; r++) {
        size_t k = (size_t)r * Z + j;
        acc += 0.5 * (mu[k] * mu[k] + exp(logvar[k]) - 1 - logvar[k]);
    }
    return acc / B;
}

/* The batch KL term with free bits L nats per latent dimension (Kingma et al. 2016, eq. 15):
 * sum_j max(L, mean_b KL_bj),  KL_bj = 0.5 (mu_bj^2 + exp(logvar_bj) - 1 - logvar_bj).  mu, logvar (B, Z)
 * -> 0-d; L = 0 gives mean_b KL(q(z|x_b) || N(0, I)), the plain batch-mean KL. */
double kl_free_bits_forward(const double *mu, const double *logvar, double free_bits, int B, int Z) {
    double acc = 0.0;
    for (int j = 0; j < Z; j++) {
        double m = kl_column_mean(mu, logvar, B, Z, j);
        acc += m > free_bits ? m : free_bits;
    }
    return acc;
}

/* a_j = [mean_b KL_bj > L] (a dimension under its free bits gets no gradient),
 * dmu = dkl a_j mu / B,  dlogvar = dkl a_j (exp(logvar) - 1) / (2 B).  dkl 0-d. */
void kl_free_bits_backward(double dkl, const double *mu, const double *logvar, double free_bits, double *dmu,
                           double *dlogvar, int B, int Z) {
    for (int j = 0; j < Z; j++) {
        double d = kl_column_mean(mu, logvar, B, Z, j) > free_bits ? dkl / B : 0.0;
        for (int r = 0; r < B; r++) {
            size_t k = (size_t)r * Z + j;
            dmu[k] = d * mu[k];
            dlogvar[k] = d * 0.5 * (exp(logvar[k]) - 1);
        }
    }
}

/* ================================================================================================
 * categorical distributions from logits s (B, C), along the class axis, from the max-shifted logits
 * ================================================================================================ */

/* q = softmax(s) along the last axis: exp(s - max) / sum exp(s - max).  s: (B, C) -> (B, C). */
void softmax_forward(const double *s, double *q, int B, int C) {
    for (int r = 0; r < B; r++) {
        const double *sr = s + (size_t)r * C;
        double *qr = q + (size_t)r * C, m = -INFINITY, acc = 0.0;
        for (int c = 0; c < C; c++) m = sr[c] > m ? sr[c] : m;
        for (int c = 0; c < C; c++) acc += (qr[c] = exp(sr[c] - m));
        for (int c = 0; c < C; c++) qr[c] /= acc;
    }
}

/* ds = q * (dq - sum_c dq_c q_c)   (Jacobian diag(q) - q q^T applied to dq), q = softmax(s). */
void softmax_backward(const double *dq, const double *q, double *ds, int B, int C) {
    for (int r = 0; r < B; r++) {
        size_t o = (size_t)r * C;
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += dq[o + c] * q[o + c];
        for (int c = 0; c < C; c++) ds[o + c] = q[o + c] * (dq[o + c] - dot);
    }
}

/* y = log softmax(s) = s - logsumexp(s) along the last axis.  s: (B, C) -> (B, C). */
void log_softmax_forward(const double *s, double *y, int B, int C) {
    for (int r = 0; r < B; r++) {
        const double *sr = s + (size_t)r * C;
        double m = -INFINITY, acc = 0.0;
        for (int c = 0; c < C; c++) m = sr[c] > m ? sr[c] : m;
        for (int c = 0; c < C; c++) acc += exp(sr[c] - m);
        double lse = log(acc);
        for (int c = 0; c < C; c++) y[(size_t)r * C + c] = (sr[c] - m) - lse;
    }
}

/* ds = dy - softmax(s) * sum_c dy_c,   from y = log_softmax(s) (softmax = exp(y)). */
void log_softmax_backward(const double *dy, const double *y, double *ds, int B, int C) {
    for (int r = 0; r < B; r++) {
        size_t o = (size_t)r * C;
        double sum = 0.0;
        for (int c = 0; c < C; c++) sum += dy[o + c];
        for (int c = 0; c < C; c++) ds[o + c] = dy[o + c] - exp(y[o + c]) * sum;
    }
}

/* Cross-entropy of integer labels under softmax(s), per row: -log q_y = logsumexp(s) - s_y.
 * s: (B, C) logits, labels: (B,) integers in [0, C) -> (B,). */
void softmax_ce_forward(const double *s, const long *labels, double *loss, int B, int C) {
    double *y = scratch((size_t)B * C);
    log_softmax_forward(s, y, B, C);
    for (int r = 0; r < B; r++) loss[r] = -y[(size_t)r * C + labels[r]];
    free(y);
}

/* ds = dloss[:, None] * (softmax(s) - onehot(labels)). */
void softmax_ce_backward(const double *dloss, const double *s, const long *labels, double *ds, int B, int C) {
    softmax_forward(s, ds, B, C);
    for (int r = 0; r < B; r++) {
        ds[(size_t)r * C + labels[r]] -= 1;
        for (int c = 0; c < C; c++) ds[(size_t)r * C + c] *= dloss[r];
    }
}

/* H(softmax(s)) per row = -sum_c q_c log q_c.  s: (B, C) -> (B,), in nats. */
void softmax_entropy_forward(const double *s, double *H, int B, int C) {
    double *lq = scratch((size_t)B * C);
    log_softmax_forward(s, lq, B, C);
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int c = 0; c < C; c++) acc += exp(lq[(size_t)r * C + c]) * lq[(size_t)r * C + c];
        H[r] = -acc;
    }
    free(lq);
}

/* ds = -dH[:, None] * q * (log q + H):   dH/dq_c = -(log q_c + 1), through the softmax Jacobian
 * the constant cancels, giving q_c (-log q_c - H). */
void softmax_entropy_backward(const double *dH, const double *s, double *ds, int B, int C) {
    double *lq = scratch((size_t)B * C), *H = scratch((size_t)B);
    log_softmax_forward(s, lq, B, C);
    softmax_entropy_forward(s, H, B, C);
    for (int r = 0; r < B; r++)
        for (int c = 0; c < C; c++) {
            size_t k = (size_t)r * C + c;
            ds[k] = -dH[r] * exp(lq[k]) * (lq[k] + H[r]);
        }
    free(lq);
    free(H);
}

/* E_{softmax(s)}[v] per row = sum_c q_c v_c.   s, v: (B, C) -> (B,). */
void softmax_expectation_forward(const double *s, const double *v, double *y, int B, int C) {
    double *q = scratch((size_t)B * C);
    softmax_forward(s, q, B, C);
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int c = 0; c < C; c++) acc += q[(size_t)r * C + c] * v[(size_t)r * C + c];
        y[r] = acc;
    }
    free(q);
}

/* ds = dy * q * (v - E_q[v]),   dv = dy * q. */
void softmax_expectation_backward(const double *dy, const double *s, const double *v, double *ds, double *dv,
                                  int B, int C) {
    double *q = scratch((size_t)B * C), *E = scratch((size_t)B);
    softmax_forward(s, q, B, C);
    softmax_expectation_forward(s, v, E, B, C);
    for (int r = 0; r < B; r++)
        for (int c = 0; c < C; c++) {
            size_t k = (size_t)r * C + c;
            dv[k] = dy[r] * q[k];
            ds[k] = dv[k] * (v[k] - E[r]);
        }
    free(q);
    free(E);
}

/* ================================================================================================
 * normalizing-flow kernels: a transform x -> y reports logdet = log|det dy/dx| per row (B,); its backward
 * takes dL/dy and dL/dlogdet; an inverse y -> x reports logdet_inv = -logdet(x)
 * ================================================================================================ */

/* s = clamp(raw), the bounded log-scale of an affine coupling (b = bound):
 *   tanh   s = b * tanh(raw / b)            (|s| < b, identity slope at 0)
 *   atan   s = (2 b / pi) * atan(raw / b)   (|s| < b, softer tails; FrEIA's soft clamp)
 *   none   s = raw                          (unbounded: exp(s) can overflow) */
void scale_clamp_forward(const double *raw, double *s, size_t n, ScaleClamp kind, double bound) {
    for (size_t k = 0; k < n; k++)
        s[k] = kind == CLAMP_TANH ? bound * tanh(raw[k] / bound)
             : kind == CLAMP_ATAN ? (2 * bound / PI) * atan(raw[k] / bound) : raw[k];
}

/* d raw = ds * ds/draw:   tanh: 1 - (s/b)^2;   atan: (2/pi) / (1 + (raw/b)^2);   none: 1. */
void scale_clamp_backward(const double *ds, const double *raw, const double *s, double *draw, size_t n,
                          ScaleClamp kind, double bound) {
    for (size_t k = 0; k < n; k++) {
        double r = kind == CLAMP_TANH ? s[k] / bound : raw[k] / bound;
        draw[k] = kind == CLAMP_TANH ? ds[k] * (1 - r * r)
                : kind == CLAMP_ATAN ? ds[k] * ((2 / PI) / (1 + r * r)) : ds[k];
    }
}

/* y_b = x_b * exp(s) + t;  logdet = sum_j s_j.   xb, s, t: (B, nb) -> (y_b (B, nb), logdet (B,)). */
void affine_coupling_forward(const double *xb, const double *s, const double *t, double *yb, double *logdet,
                             int B, int nb) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int j = 0; j < nb; j++) {
            size_t k = (size_t)r * nb + j;
            yb[k] = xb[k] * exp(s[k]) + t[k];
            acc += s[k];
        }
        logdet[r] = acc;
    }
}

/* Gradients of y_b = x_b * exp(s) + t, logdet = sum s:
 *   dx_b = dy_b * exp(s)
 *   ds   = dy_b * x_b * exp(s) + dlogdet[:, None]
 *   dt   = dy_b
 * dlogdet (B,) may be NULL (no gradient reaches the log-det). */
void affine_coupling_backward(const double *dyb, const double *dlogdet, const double *xb, const double *s,
                              double *dxb, double *ds, double *dt, int B, int nb) {
    for (int r = 0; r < B; r++)
        for (int j = 0; j < nb; j++) {
            size_t k = (size_t)r * nb + j;
            dxb[k] = dyb[k] * exp(s[k]);
            ds[k] = dxb[k] * xb[k] + (dlogdet ? dlogdet[r] : 0.0);
            dt[k] = dyb[k];
        }
}

/* x_b = (y_b - t) * exp(-s);  logdet_inv = -sum_j s_j. */
void affine_coupling_inverse(const double *yb, const double *s, const double *t, double *xb, double *logdet_inv,
                             int B, int nb) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int j = 0; j < nb; j++) {
            size_t k = (size_t)r * nb + j;
            xb[k] = (yb[k] - t[k]) * exp(-s[k]);
            acc += s[k];
        }
        logdet_inv[r] = -acc;
    }
}

/* Gradients of x_b = (y_b - t) * exp(-s), logdet_inv = -sum s, written with x_b = the inverse's output:
 *   dy_b = dx_b * exp(-s)
 *   dt   = -dx_b * exp(-s)
 *   ds   = -dx_b * x_b - dlogdet_inv[:, None] */
void affine_coupling_inverse_backward(const double *dxb, const double *dlogdet_inv, const double *xb,
                                      const double *s, double *dyb, double *ds, double *dt, int B, int nb) {
    for (int r = 0; r < B; r++)
        for (int j = 0; j < nb; j++) {
            size_t k = (size_t)r * nb + j;
            dyb[k] = dxb[k] * exp(-s[k]);
            dt[k] = -dyb[k];
            ds[k] = -(dxb[k] * xb[k]) - (dlogdet_inv ? dlogdet_inv[r] : 0.0);
        }
}

/* y = x * exp(log_scale);  logdet = sum_d log_scale_d for every row.   x: (B, D), log_scale: (D,). */
void diag_scale_forward(const double *x, const double *log_scale, double *y, double *logdet, int B, int D) {
    double sum = 0.0;
    for (int d = 0; d < D; d++) sum += log_scale[d];
    for (int r = 0; r < B; r++) {
        for (int d = 0; d < D; d++) y[(size_t)r * D + d] = x[(size_t)r * D + d] * exp(log_scale[d]);
        logdet[r] = sum;
    }
}

/* dx = dy * exp(ls);  dls = sum_B dy * x * exp(ls) + sum_B dlogdet. */
void diag_scale_backward(const double *dy, const double *dlogdet, const double *x, const double *log_scale,
                         double *dx, double *dls, int B, int D) {
    double dsum = 0.0;
    for (int r = 0; r < B && dlogdet; r++) dsum += dlogdet[r];
    for (int d = 0; d < D; d++) dls[d] = 0.0;
    for (int r = 0; r < B; r++)
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            dx[k] = dy[k] * exp(log_scale[d]);
            dls[d] += dx[k] * x[k];
        }
    for (int d = 0; d < D; d++) dls[d] += dsum;
}

/* x = y * exp(-log_scale);  logdet_inv = -sum log_scale. */
void diag_scale_inverse(const double *y, const double *log_scale, double *x, double *logdet_inv, int B, int D) {
    double sum = 0.0;
    for (int d = 0; d < D; d++) sum += log_scale[d];
    for (int r = 0; r < B; r++) {
        for (int d = 0; d < D; d++) x[(size_t)r * D + d] = y[(size_t)r * D + d] * exp(-log_scale[d]);
        logdet_inv[r] = -sum;
    }
}

/* For x = y * exp(-ls) (x the inverse's output):  dy = dx * exp(-ls);
 * dls = -sum_B dx * x - sum_B dlogdet_inv. */
void diag_scale_inverse_backward(const double *dx, const double *dlogdet_inv, const double *x,
                                 const double *log_scale, double *dy, double *dls, int B, int D) {
    double dsum = 0.0;
    for (int r = 0; r < B && dlogdet_inv; r++) dsum += dlogdet_inv[r];
    for (int d = 0; d < D; d++) dls[d] = 0.0;
    for (int r = 0; r < B; r++)
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            dy[k] = dx[k] * exp(-log_scale[d]);
            dls[d] -= dx[k] * x[k];
        }
    for (int d = 0; d < D; d++) dls[d] -= dsum;
}

/* y = logit(p) = log p - log(1 - p),  p = alpha + (1 - 2 alpha) x;
 * logdet = sum_d [log(1 - 2 alpha) - log p_d - log(1 - p_d)].   RealNVP's preprocessing of pixels in [0, 1]. */
void logit_forward(const double *x, double *y, double *logdet, int B, int D, double alpha) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            double p = alpha + (1 - 2 * alpha) * x[k], lp = log(p), l1p = log1p(-p);
            y[k] = lp - l1p;
            acc += log(1 - 2 * alpha) - lp - l1p;
        }
        logdet[r] = acc;
    }
}

/* dx = (1 - 2a) / (p (1 - p)) * (dy + dlogdet[:, None] * (2 p - 1)),  p = a + (1 - 2a) x. */
void logit_backward(const double *dy, const double *dlogdet, const double *x, double *dx, int B, int D,
                    double alpha) {
    for (int r = 0; r < B; r++)
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            double p = alpha + (1 - 2 * alpha) * x[k];
            double g = dlogdet ? dy[k] + dlogdet[r] * (2 * p - 1) : dy[k];
            dx[k] = g * ((1 - 2 * alpha) / (p * (1 - p)));
        }
}

/* x = (sigmoid(y) - alpha) / (1 - 2 alpha);  logdet_inv = sum_d [log p + log(1 - p) - log(1 - 2 alpha)],
 * p = sigmoid(y);  log p + log(1 - p) = -softplus(-y) - softplus(y), stable for large |y|. */
void logit_inverse(const double *y, double *x, double *logdet_inv, int B, int D, double alpha) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            x[k] = (sigmoid(y[k]) - alpha) / (1 - 2 * alpha);
            acc += -softplus(-y[k]) - softplus(y[k]) - log(1 - 2 * alpha);
        }
        logdet_inv[r] = acc;
    }
}

/* dy = dx * p (1 - p) / (1 - 2a) + dlogdet_inv[:, None] * (1 - 2 p),  p = sigmoid(y). */
void logit_inverse_backward(const double *dx, const double *dlogdet_inv, const double *y, double *dy, int B, int D,
                            double alpha) {
    for (int r = 0; r < B; r++)
        for (int d = 0; d < D; d++) {
            size_t k = (size_t)r * D + d;
            double p = sigmoid(y[k]);
            dy[k] = dx[k] * (p * (1 - p) / (1 - 2 * alpha)) + (dlogdet_inv ? dlogdet_inv[r] * (1 - 2 * p) : 0.0);
        }
}

/* log N(z; 0, I) per row = -0.5 * sum_d (z_d^2 + log 2 pi). */
void gaussian_logprob_forward(const double *z, double *logp, int B, int D) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int d = 0; d < D; d++) acc += z[(size_t)r * D + d] * z[(size_t)r * D + d];
        logp[r] = -0.5 * acc - 0.5 * LOG_2PI * D;
    }
}

/* dz = -dlogp[:, None] * z. */
void gaussian_logprob_backward(const double *dlogp, const double *z, double *dz, int B, int D) {
    for (int r = 0; r < B; r++)
        for (int d = 0; d < D; d++) dz[(size_t)r * D + d] = -dlogp[r] * z[(size_t)r * D + d];
}

/* Standard logistic log-density per row: sum_d -(softplus(z_d) + softplus(-z_d))
 * = sum_d -(|z_d| + 2 log1p(exp(-|z_d|))). */
void logistic_logprob_forward(const double *z, double *logp, int B, int D) {
    for (int r = 0; r < B; r++) {
        double acc = 0.0;
        for (int d = 0; d < D; d++) {
            double a = fabs(z[(size_t)r * D + d]);
            acc += a + 2 * log1p(exp(-a));
        }
        logp[r] = -acc;
    }
}

/* dz = dlogp[:, None] * (1 - 2 sigmoid(z)) = -dlogp[:, None] * tanh(z / 2). */
void logistic_logprob_backward(const double *dlogp, const double *z, double *dz, int B, int D) {
    for (int r = 0; r < B; r++)
        for (int d = 0; d < D; d++) dz[(size_t)r * D + d] = -dlogp[r] * tanh(0.5 * z[(size_t)r * D + d]);
}

/* ================================================================================================
 * convolutions (NCHW, PyTorch's layout): output pixel (ho, wo) reads input pixels
 *   h = ho s - p + i d,   w = wo s - p + j d      (i < kh, j < kw; outside [0, H) x [0, W) they are 0),
 * so Ho = (H + 2p - d (kh - 1) - 1) / s + 1 (integer division) and likewise Wo.
 * npdgm writes these as im2col + one product; the loops below are the same sums.
 * ================================================================================================ */

/* y[b, o, ho, wo] = b[o] + sum_{c, i, j} W[o, c, i, j] x[b, c, ho s - p + i d, wo s - p + j d].
 * x (B, C, H, W), W (O, C, kh, kw), b (O,) or NULL -> y (B, O, Ho, Wo). */
void conv2d_forward(const double *x, const double *W, const double *b, double *y, int B, int C, int H, int Wd,
                    int O, int kh, int kw, ConvGeometry g, int Ho, int Wo) {
    for (int n = 0; n < B; n++)
        for (int o = 0; o < O; o++)
            for (int ho = 0; ho < Ho; ho++)
                for (int wo = 0; wo < Wo; wo++) {
                    double acc = 0.0;
                    for (int c = 0; c < C; c++)
                        for (int i = 0; i < kh; i++) {
                            int h = ho * g.sh - g.ph + i * g.dh;
                            if (h < 0 || h >= H) continue;
                            for (int j = 0; j < kw; j++) {
                                int w = wo * g.sw - g.pw + j * g.dw;
                                if (w < 0 || w >= Wd) continue;
                                acc += W[(((size_t)o * C + c) * kh + i) * kw + j]
                                     * x[(((size_t)n * C + c) * H + h) * Wd + w];
                            }
                        }
                    y[(((size_t)n * O + o) * Ho + ho) * Wo + wo] = acc + (b ? b[o] : 0.0);
                }
}

/* dy (B, O, Ho, Wo) -> (dx, dW, db):
 *   dW[o, c, i, j] = sum_{b, ho, wo} dy[b, o, ho, wo] x[b, c, h, w],   db = sum_{b, ho, wo} dy,
 *   dx[b, c, h, w] = sum of dy[b, o, ho, wo] W[o, c, i, j] over every (o, ho, wo, i, j) that read (h, w)
 *   (npdgm: dW = D.T @ im2col(x), dx = col2im(D @ W.reshape(O, C kh kw)), D = dy as rows).
 * dx, dW or db may be NULL (not wanted). */
void conv2d_backward(const double *dy, const double *x, const double *W, double *dx, double *dW, double *db,
                     int B, int C, int H, int Wd, int O, int kh, int kw, ConvGeometry g, int Ho, int Wo) {
    if (dx) memset(dx, 0, sizeof(double) * (size_t)B * C * H * Wd);
    if (dW) memset(dW, 0, sizeof(double) * (size_t)O * C * kh * kw);
    if (db) memset(db, 0, sizeof(double) * (size_t)O);
    for (int n = 0; n < B; n++)
        for (int o = 0; o < O; o++)
            for (int ho = 0; ho < Ho; ho++)
                for (int wo = 0; wo < Wo; wo++) {
                    double d = dy[(((size_t)n * O + o) * Ho + ho) * Wo + wo];
                    if (db) db[o] += d;
                    for (int c = 0; c < C; c++)
                        for (int i = 0; i < kh; i++) {
                            int h = ho * g.sh - g.ph + i * g.dh;
                            if (h < 0 || h >= H) continue;
                            for (int j = 0; j < kw; j++) {
                                int w = wo * g.sw - g.pw + j * g.dw;
                                if (w < 0 || w >= Wd) continue;
                                size_t wi = (((size_t)o * C + c) * kh + i) * kw + j;
                                size_t xi = (((size_t)n * C + c) * H + h) * Wd + w;
                                if (dW) dW[wi] += d * x[xi];
                                if (dx) dx[xi] += d * W[wi];
                            }
                        }
                }
}

/* Space to depth: x (B, C, H, W) -> y (B, C f f, H / f, W / f),
 * y[b, c f^2 + i f + j, h, w] = x[b, c, h f + i, w f + j] (PyTorch's pixel_unshuffle). A permutation:
 * log|det| = 0 and its inverse is unsqueeze_forward; its backward is dx = unsqueeze(dy) (the adjoint of a
 * permutation is its inverse). H and W are x's (the caller checks that f divides them). */
void squeeze_forward(const double *x, double *y, int B, int C, int H, int W, int f) {
    int h2 = H / f, w2 = W / f;
    for (int b = 0; b < B; b++)
        for (int c = 0; c < C; c++)
            for (int i = 0; i < f; i++)
                for (int j = 0; j < f; j++)
                    for (int h = 0; h < h2; h++)
                        for (int w = 0; w < w2; w++)
                            y[((((size_t)b * C + c) * f * f + i * f + j) * h2 + h) * w2 + w] =
                                x[(((size_t)b * C + c) * H + h * f + i) * W + w * f + j];
}

/* Depth to space, the inverse of squeeze_forward: y (B, C f f, H / f, W / f) -> x (B, C, H, W);
 * its backward is dy = squeeze(dx). C, H, W are x's. */
void unsqueeze_forward(const double *y, double *x, int B, int C, int H, int W, int f) {
    int h2 = H / f, w2 = W / f;
    for (int b = 0; b < B; b++)
        for (int c = 0; c < C; c++)
            for (int i = 0; i < f; i++)
                for (int j = 0; j < f; j++)
                    for (int h = 0; h < h2; h++)
                        for (int w = 0; w < w2; w++)
                            x[(((size_t)b * C + c) * H + h * f + i) * W + w * f + j] =
                                y[((((size_t)b * C + c) * f * f + i * f + j) * h2 + h) * w2 + w];
}

/* ================================================================================================
 * Adam (docs/adam.md; PyTorch's formulas), at step t = 1, 2, ... with m_0 = v_0 = 0:
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
 * ================================================================================================ */
void adam_step(Adam *opt, double *p, const double *g) {
    opt->t += 1;
    double c1 = 1 - pow(opt->beta1, (double)opt->t), c2 = 1 - pow(opt->beta2, (double)opt->t);
    for (size_t k = 0; k < opt->n; k++) {
        opt->m[k] = opt->beta1 * opt->m[k] + (1 - opt->beta1) * g[k];
        opt->v[k] = opt->beta2 * opt->v[k] + (1 - opt->beta2) * g[k] * g[k];
        double mhat = opt->m[k] / c1, vhat = opt->v[k] / c2;
        p[k] -= opt->lr * mhat / (sqrt(vhat) + opt->eps);
    }
}

/* ================================================================================================
 * the VAE (docs/checkpoints.md: names and shapes; npdgm/models/vae.py):
 *   h = encoder(x) (MLP, W (in,out)); mu, logvar = h[:, :Z], h[:, Z:];  z_k = mu + exp(logvar/2) eps_k;
 *   out = decoder(z_k);  recon = mean_b (1/K) sum_k NLL(x_b | out_bk) (summed over pixels);
 *   kl = mean_b 0.5 sum_j (mu^2 + e^logvar - 1 - logvar);  loss = recon + beta kl;  nelbo = recon + kl;
 *   NLL = sum_d softplus(out) - x out (Bernoulli logits).
 * An MLP is Linear, activation, Linear, ..., Linear (no activation after the last), its Linear layers
 * named <prefix>.0, <prefix>.2, ...; encoder sizes x_dim -> hidden... -> 2 z_dim, decoder sizes
 * z_dim -> reversed hidden... -> x_dim. The flat buffer holds encoder.0.W, encoder.0.b, encoder.2.W, ...,
 * then decoder.0.W, ..., each W (in, out) and b (out,) in C order, one after another.
 * ================================================================================================ */

/* the sizes of MLP `net` (0 encoder, 1 decoder): n_hidden + 2 of them */
static void mlp_sizes(const VAEConfig *c, int net, int *sizes) {
    int L = c->n_hidden;
    sizes[0] = net == 0 ? c->x_dim : c->z_dim;
    for (int i = 0; i < L; i++) sizes[1 + i] = net == 0 ? c->hidden[i] : c->hidden[L - 1 - i];
    sizes[L + 1] = net == 0 ? 2 * c->z_dim : c->x_dim;
}

int vae_param_info(const VAEConfig *c, int i, char *name, size_t name_size, int shape[2], size_t *offset) {
    int per_net = 2 * (c->n_hidden + 1), sizes[VAE_MAX_LAYERS + 2];
    if (i < 0 || i >= 2 * per_net) return -1;
    size_t off = 0;
    for (int k = 0; k <= i; k++) {
        int net = k / per_net, layer = (k % per_net) / 2, is_b = k % 2;
        mlp_sizes(c, net, sizes);
        shape[0] = is_b ? sizes[layer + 1] : sizes[layer];
        shape[1] = is_b ? 1 : sizes[layer + 1];
        if (k == i) {
            *offset = off;
            snprintf(name, name_size, "%s.%d.%s", net == 0 ? "encoder" : "decoder", 2 * layer, is_b ? "b" : "W");
            return is_b ? 1 : 2;
        }
        off += (size_t)shape[0] * shape[1];
    }
    return -1;
}

size_t vae_num_params(const VAEConfig *c) {
    size_t n = 0;
    for (int net = 0; net < 2; net++) {
        int sizes[VAE_MAX_LAYERS + 2];
        mlp_sizes(c, net, sizes);
        for (int l = 0; l <= c->n_hidden; l++) n += (size_t)sizes[l] * sizes[l + 1] + sizes[l + 1];
    }
    return n;
}

/* One MLP's activations for a batch of `rows`: act[0] the input, pre[l] = act[l] @ W_l + b_l, act[l+1] =
 * f(pre[l]) for the hidden layers; the output is pre[L] (no activation). */
typedef struct { int L, sizes[VAE_MAX_LAYERS + 2]; double *pre[VAE_MAX_LAYERS + 1], *act[VAE_MAX_LAYERS + 2]; } MLPCache;

static int mlp_forward(const VAEConfig *c, int net, const double *params, size_t *off, const double *in, int rows,
                       MLPCache *m) {
    m->L = c->n_hidden + 1;
    mlp_sizes(c, net, m->sizes);
    m->act[0] = (double *)in;
    for (int l = 0; l < m->L; l++) {
        int fin = m->sizes[l], fout = m->sizes[l + 1];
        const double *W = params + *off, *b = W + (size_t)fin * fout;
        *off += (size_t)fin * fout + fout;
        m->pre[l] = malloc(sizeof(double) * (size_t)rows * fout);
        m->act[l + 1] = l + 1 < m->L ? malloc(sizeof(double) * (size_t)rows * fout) : m->pre[l];
        if (!m->pre[l] || !m->act[l + 1]) return -1;
        linear_forward(m->act[l], W, b, m->pre[l], rows, fin, fout);
        if (l + 1 < m->L) activation_forward(c->act, m->pre[l], m->act[l + 1], (size_t)rows * fout);
    }
    return 0;
}

/* from d output (rows, sizes[L]) to the parameter gradients at grads + off and (if din) d input */
static int mlp_backward(const VAEConfig *c, const double *params, const double *grads_base, size_t off,
                        const MLPCache *m, const double *dout, double *din, int rows) {
    size_t offs[VAE_MAX_LAYERS + 1];
    for (int l = 0; l < m->L; l++) {
        offs[l] = off;
        off += (size_t)m->sizes[l] * m->sizes[l + 1] + m->sizes[l + 1];
    }
    double *g = malloc(sizeof(double) * (size_t)rows * m->sizes[m->L]);
    if (!g) return -1;
    memcpy(g, dout, sizeof(double) * (size_t)rows * m->sizes[m->L]);
    for (int l = m->L - 1; l >= 0; l--) {
        int fin = m->sizes[l], fout = m->sizes[l + 1];
        double *dW = (double *)grads_base + offs[l], *db = dW + (size_t)fin * fout;
        double *gin = l > 0 ? malloc(sizeof(double) * (size_t)rows * fin) : din;
        if (l > 0 && !gin) { free(g); return -1; }
        linear_backward(g, m->act[l], params + offs[l], gin, dW, db, rows, fin, fout);
        free(g);
        g = NULL;
        if (l > 0) {  /* through the activation in front of this layer: act[l] = f(pre[l-1]) */
            activation_backward(c->act, gin, m->pre[l - 1], m->act[l], gin, (size_t)rows * fin);
            g = gin;
        }
    }
    return 0;
}

static void mlp_free(MLPCache *m) {
    for (int l = 0; l < m->L; l++) {
        if (l + 1 < m->L) free(m->act[l + 1]);
        free(m->pre[l]);
    }
}

int vae_loss_and_grad(const VAEConfig *c, const double *params, const double *x, const double *eps, int B, int K,
                      double *grads, VAETerms *terms) {
    int D = c->x_dim, Z = c->z_dim, KB = K * B, rc = -1;
    size_t P = vae_num_params(c), off = 0;
    MLPCache enc = {0}, dec = {0};
    double *mu = malloc(sizeof(double) * (size_t)B * Z), *lv = malloc(sizeof(double) * (size_t)B * Z);
    double *z = malloc(sizeof(double) * (size_t)KB * Z), *xk = malloc(sizeof(double) * (size_t)KB * D);
    double *nll = malloc(sizeof(double) * KB), *kl = malloc(sizeof(double) * B);
    double *dnll = malloc(sizeof(double) * KB), *dlogits = malloc(sizeof(double) * (size_t)KB * D);
    double *dz = malloc(sizeof(double) * (size_t)KB * Z), *dkl = malloc(sizeof(double) * B);
    double *dmu = malloc(sizeof(double) * (size_t)B * Z), *dlv = malloc(sizeof(double) * (size_t)B * Z);
    double *dmu_kl = malloc(sizeof(double) * (size_t)B * Z), *dlv_kl = malloc(sizeof(double) * (size_t)B * Z);
    double *dh = malloc(sizeof(double) * (size_t)B * 2 * Z);
    if (!mu || !lv || !z || !xk || !nll || !kl || !dnll || !dlogits || !dz || !dkl || !dmu || !dlv || !dmu_kl
        || !dlv_kl || !dh)
        goto done;
    memset(grads, 0, sizeof(double) * P);

    /* forward: encoder, split, reparameterize, decoder on the K B samples, the two terms */
    if (mlp_forward(c, 0, params, &off, x, B, &enc) != 0) goto done;
    const double *h = enc.pre[enc.L - 1];
    for (int r = 0; r < B; r++)
        for (int j = 0; j < Z; j++) {
            mu[(size_t)r * Z + j] = h[(size_t)r * 2 * Z + j];
            lv[(size_t)r * Z + j] = h[(size_t)r * 2 * Z + Z + j];
        }
    reparameterize_forward(mu, lv, eps, z, K, B * Z);
    size_t dec_off = off;
    if (mlp_forward(c, 1, params, &off, z, KB, &dec) != 0) goto done;
    const double *logits = dec.pre[dec.L - 1];
    for (int k = 0; k < K; k++) memcpy(xk + (size_t)k * B * D, x, sizeof(double) * (size_t)B * D);
    bernoulli_nll_forward(logits, xk, nll, KB, D);
    kl_std_normal_forward(mu, lv, kl, B, Z);
    double recon = 0.0, klm = 0.0;
    for (int i = 0; i < KB; i++) recon += nll[i];
    for (int r = 0; r < B; r++) klm += kl[r];
    recon /= KB;
    klm /= B;
    terms->recon = recon;
    terms->kl = klm;
    terms->loss = recon + c->beta * klm;
    terms->nelbo = recon + klm;

    /* backward: d loss / d nll_kb = 1 / (K B), d loss / d kl_b = beta / B */
    for (int i = 0; i < KB; i++) dnll[i] = 1.0 / KB;
    for (int r = 0; r < B; r++) dkl[r] = c->beta / B;
    bernoulli_nll_backward(dnll, logits, xk, dlogits, KB, D);
    if (mlp_backward(c, params, grads, dec_off, &dec, dlogits, dz, KB) != 0) goto done;
    reparameterize_backward(dz, lv, eps, dmu, dlv, K, B * Z);
    kl_std_normal_backward(dkl, mu, lv, dmu_kl, dlv_kl, B, Z);
    for (int r = 0; r < B; r++)
        for (int j = 0; j < Z; j++) {
            size_t k = (size_t)r * Z + j;
            dh[(size_t)r * 2 * Z + j] = dmu[k] + dmu_kl[k];
            dh[(size_t)r * 2 * Z + Z + j] = dlv[k] + dlv_kl[k];
        }
    if (mlp_backward(c, params, grads, 0, &enc, dh, NULL, B) != 0) goto done;
    rc = 0;
done:
    mlp_free(&enc);
    mlp_free(&dec);
    free(mu); free(lv); free(z); free(xk); free(nll); free(kl); free(dnll); free(dlogits); free(dz); free(dkl);
    free(dmu); free(dlv); free(dmu_kl); free(dlv_kl); free(dh);
    return rc;
}

int vae_train_step(const VAEConfig *c, double *params, double *grads, Adam *opt, const double *x, const double *eps,
                   int B, int K, VAETerms *terms) {
    if (vae_loss_and_grad(c, params, x, eps, B, K, grads, terms) != 0) return -1;
    adam_step(opt, params, grads);
    return 0;
}
