/* npdgm.h: the plain-C port of npdgm's kernel table (float64, C99, libc + libm only).
 *
 * Every array is a contiguous row-major (C order) block of doubles, shapes as in npdgm:
 * x (B, D), a Linear W (in, out) and b (out,), conv x (B, C, H, W). A forward and its backward sit side by
 * side; a backward takes exactly what it needs and writes (never adds) its outputs. The math comments
 * in npdgm.c are the Python kernels' docstrings. */
#ifndef NPDGM_H
#define NPDGM_H

#include <stddef.h>

/* -- linear -------------------------------------------------------------------------------------- */
void linear_forward(const double *x, const double *W, const double *b, double *y, int B, int in, int out);
void linear_backward(const double *dy, const double *x, const double *W, double *dx, double *dW, double *db,
                     int B, int in, int out);
void masked_linear_forward(const double *x, const double *W, const double *M, const double *b, double *y,
                           int B, int in, int out);
void masked_linear_backward(const double *dy, const double *x, const double *W, const double *M, double *dx,
                            double *dW, double *db, int B, int in, int out);

/* -- activations (n elements) -------------------------------------------------------------------- */
typedef enum { ACT_IDENTITY, ACT_RELU, ACT_LEAKY_RELU, ACT_TANH, ACT_SIGMOID, ACT_SOFTPLUS, ACT_ELU,
               ACT_COUNT } Activation;
extern const char *const ACTIVATION_NAMES[ACT_COUNT];
int activation_by_name(const char *name);  /* -1 when unknown */
void activation_forward(Activation a, const double *x, double *y, size_t n);
/* dx from dy and both x and y (each activation reads the one its derivative needs) */
void activation_backward(Activation a, const double *dy, const double *x, const double *y, double *dx,
                         size_t n);
double sigmoid(double x);
double softplus(double x);

/* -- losses (one value per row) ------------------------------------------------------------------ */
void bernoulli_nll_forward(const double *logits, const double *x, double *loss, int B, int D);
void bernoulli_nll_backward(const double *dloss, const double *logits, const double *x, double *dl, int B, int D);
/* logvar has lv_n elements: 1 (a scalar), D (per dimension) or B*D (per element) */
void gaussian_nll_forward(const double *mu, const double *x, const double *logvar, size_t lv_n, double *loss,
                          int B, int D);
void gaussian_nll_backward(const double *dloss, const double *mu, const double *x, const double *logvar,
                           size_t lv_n, double *dmu, double *dlogvar, int B, int D);
double mse_forward(const double *pred, const double *target, size_t n);
void mse_backward(double dloss, const double *pred, const double *target, double *dpred, size_t n);
void logsumexp_forward(const double *a, double *y, int B, int C);
void logsumexp_backward(const double *dy, const double *a, const double *y, double *da, int B, int C);

/* -- Gaussian q(z|x) ----------------------------------------------------------------------------- */
/* eps and z are (K, B, Z); K = 1 is one sample */
void reparameterize_forward(const double *mu, const double *logvar, const double *eps, double *z, int K, int BZ);
void reparameterize_backward(const double *dz, const double *logvar, const double *eps, double *dmu,
                             double *dlogvar, int K, int BZ);
void kl_std_normal_forward(const double *mu, const double *logvar, double *kl, int B, int Z);
void kl_std_normal_backward(const double *dkl, const double *mu, const double *logvar, double *dmu,
                            double *dlogvar, int B, int Z);
double kl_free_bits_forward(const double *mu, const double *logvar, double free_bits, int B, int Z);
void kl_free_bits_backward(double dkl, const double *mu, const double *logvar, double free_bits, double *dmu,
                           double *dlogvar, int B, int Z);

/* -- categorical (softmax over the last axis of (B, C)) -------------------------------------------- */
void softmax_forward(const double *s, double *q, int B, int C);
void softmax_backward(const double *dq, const double *q, double *ds, int B, int C);
void log_softmax_forward(const double *s, double *y, int B, int C);
void log_softmax_backward(const double *dy, const double *y, double *ds, int B, int C);
void softmax_ce_forward(const double *s, const long *labels, double *loss, int B, int C);
void softmax_ce_backward(const double *dloss, const double *s, const long *labels, double *ds, int B, int C);
void softmax_entropy_forward(const double *s, double *H, int B, int C);
void softmax_entropy_backward(const double *dH, const double *s, double *ds, int B, int C);
void softmax_expectation_forward(const double *s, const double *v, double *y, int B, int C);
void softmax_expectation_backward(const double *dy, const double *s, const double *v, double *ds, double *dv,
                                  int B, int C);

/* -- flows: (output, logdet) pairs and their inverses ---------------------------------------------- */
typedef enum { CLAMP_TANH, CLAMP_ATAN, CLAMP_NONE } ScaleClamp;
void scale_clamp_forward(const double *raw, double *s, size_t n, ScaleClamp kind, double bound);
void scale_clamp_backward(const double *ds, const double *raw, const double *s, double *draw, size_t n,
                          ScaleClamp kind, double bound);
void affine_coupling_forward(const double *xb, const double *s, const double *t, double *yb, double *logdet,
                             int B, int nb);
void affine_coupling_backward(const double *dyb, const double *dlogdet, const double *xb, const double *s,
                              double *dxb, double *ds, double *dt, int B, int nb);
void affine_coupling_inverse(const double *yb, const double *s, const double *t, double *xb, double *logdet_inv,
                             int B, int nb);
void affine_coupling_inverse_backward(const double *dxb, const double *dlogdet_inv, const double *xb,
                                      const double *s, double *dyb, double *ds, double *dt, int B, int nb);
void diag_scale_forward(const double *x, const double *log_scale, double *y, double *logdet, int B, int D);
void diag_scale_backward(const double *dy, const double *dlogdet, const double *x, const double *log_scale,
                         double *dx, double *dls, int B, int D);
void diag_scale_inverse(const double *y, const double *log_scale, double *x, double *logdet_inv, int B, int D);
void diag_scale_inverse_backward(const double *dx, const double *dlogdet_inv, const double *x,
                                 const double *log_scale, double *dy, double *dls, int B, int D);
void logit_forward(const double *x, double *y, double *logdet, int B, int D, double alpha);
void logit_backward(const double *dy, const double *dlogdet, const double *x, double *dx, int B, int D,
                    double alpha);
void logit_inverse(const double *y, double *x, double *logdet_inv, int B, int D, double alpha);
void logit_inverse_backward(const double *dx, const double *dlogdet_inv, const double *y, double *dy, int B, int D,
                            double alpha);
void gaussian_logprob_forward(const double *z, double *logp, int B, int D);
void gaussian_logprob_backward(const double *dlogp, const double *z, double *dz, int B, int D);
void logistic_logprob_forward(const double *z, double *logp, int B, int D);
void logistic_logprob_backward(const double *dlogp, const double *z, double *dz, int B, int D);

/* -- convolutions (NCHW), squeeze ------------------------------------------------------------------ */
typedef struct { int sh, sw, ph, pw, dh, dw; } ConvGeometry;  /* stride, padding, dilation per axis */
void conv2d_forward(const double *x, const double *W, const double *b, double *y, int B, int C, int H, int Wd,
                    int O, int kh, int kw, ConvGeometry g, int Ho, int Wo);
void conv2d_backward(const double *dy, const double *x, const double *W, double *dx, double *dW, double *db,
                     int B, int C, int H, int Wd, int O, int kh, int kw, ConvGeometry g, int Ho, int Wo);
void squeeze_forward(const double *x, double *y, int B, int C, int H, int W, int f);
void unsqueeze_forward(const double *y, double *x, int B, int C, int H, int W, int f);

/* -- Adam (PyTorch's formulas) --------------------------------------------------------------------- */
typedef struct { double lr, beta1, beta2, eps; long t; double *m, *v; size_t n; } Adam;
void adam_step(Adam *opt, double *p, const double *g);

/* -- the VAE (Bernoulli decoder): MLP encoder x -> [mu | logvar], MLP decoder z -> logits ----------- */
#define VAE_MAX_LAYERS 16
typedef struct {
    int x_dim, z_dim, n_hidden, hidden[VAE_MAX_LAYERS];
    Activation act;
    double beta;
} VAEConfig;
typedef struct { double loss, recon, kl, nelbo; } VAETerms;
size_t vae_num_params(const VAEConfig *c);
/* the i-th parameter (0 <= i < 4 (n_hidden + 1)) in the flat buffer's order: name, ndim, shape, offset */
int vae_param_info(const VAEConfig *c, int i, char *name, size_t name_size, int shape[2], size_t *offset);
/* loss = mean_b (1/K) sum_k NLL(x_b | decoder(z_kb)) + beta mean_b KL_b; grads (zeroed first) = d loss / d params.
 * x (B, x_dim), eps (K, B, z_dim). Returns 0, or -1 when out of memory. */
int vae_loss_and_grad(const VAEConfig *c, const double *params, const double *x, const double *eps, int B, int K,
                      double *grads, VAETerms *terms);
/* one training step: the gradient at (x, eps), then an Adam update of params */
int vae_train_step(const VAEConfig *c, double *params, double *grads, Adam *opt, const double *x, const double *eps,
                   int B, int K, VAETerms *terms);

#endif
