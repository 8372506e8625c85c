/* check.c: run one reference case of npdgm's kernel table (or the vae_bernoulli model case) on tensors read
 * from stdin and write its outputs and gradients to stdout.
 *
 *   check --list          the cases this port implements, one per line
 *   check CASE < in.bin > out.bin
 *
 * The binary format (all integers int64, all numbers float64, little-endian):
 *   count, then per tensor: name length, name (bytes, no terminator), ndim, dims[ndim], data[prod(dims)]
 * in.bin holds the case's inputs by their reference names without the "input/" prefix (x, W, dy, ...);
 * integer inputs (labels) are sent as float64. out.bin holds "output/<name>" and "grad/<name>" tensors, the
 * keys of the reference .npz files. The vae_bernoulli case reads params, x, eps and the model's config as
 * hidden (the hidden sizes), beta (0-d), activation and likelihood (strings as 1-D tensors of byte values).
 * Errors: one line "npdgm-c: error: ..." on stderr, exit status 2. */
#include "npdgm.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TENSORS 64
#define MAX_NAME 255
#define MAX_DIM 8
#define MAX_ELEMS ((int64_t)1 << 28)

typedef struct {
    char name[MAX_NAME + 1];
    int ndim;
    int64_t dims[MAX_DIM];
    size_t n;
    double *data;
} Tensor;

typedef struct { Tensor t[MAX_TENSORS]; int count; } Tensors;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("npdgm-c: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* -- the binary format ------------------------------------------------------------------------- */
static int little_endian(void) {
    uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static void swap_bytes(void *p, size_t size, size_t count) {
    unsigned char *b = p;
    for (size_t k = 0; k < count; k++, b += size)
        for (size_t i = 0; i < size / 2; i++) {
            unsigned char t = b[i];
            b[i] = b[size - 1 - i];
            b[size - 1 - i] = t;
        }
}

static void read_exact(void *p, size_t size, size_t count, const char *what) {
    if (count && fread(p, size, count, stdin) != count) die("stdin ends inside %s (truncated input)", what);
    if (!little_endian()) swap_bytes(p, size, count);
}

static int64_t read_int(const char *what) {
    int64_t v;
    read_exact(&v, sizeof v, 1, what);
    return v;
}

static void read_tensors(Tensors *in) {
    int64_t count = read_int("the tensor count");
    if (count < 0 || count > MAX_TENSORS) die("the tensor count is %lld (expected 0 to %d)", (long long)count,
                                              MAX_TENSORS);
    for (int64_t k = 0; k < count; k++) {
        Tensor *t = &in->t[in->count];
        int64_t len = read_int("a name length");
        if (len < 1 || len > MAX_NAME) die("tensor %lld: name length %lld (expected 1 to %d)", (long long)k,
                                           (long long)len, MAX_NAME);
        if (fread(t->name, 1, (size_t)len, stdin) != (size_t)len) die("stdin ends inside tensor %lld's name",
                                                                     (long long)k);
        t->name[len] = '\0';
        int64_t ndim = read_int("a tensor's ndim");
        if (ndim < 0 || ndim > MAX_DIM) die("tensor %s: ndim %lld (expected 0 to %d)", t->name, (long long)ndim,
                                            MAX_DIM);
        t->ndim = (int)ndim;
        int64_t n = 1;
        for (int d = 0; d < t->ndim; d++) {
            t->dims[d] = read_int("a tensor's dims");
            if (t->dims[d] < 0 || t->dims[d] > MAX_ELEMS) die("tensor %s: dimension %d is %lld", t->name, d,
                                                              (long long)t->dims[d]);
            n *= t->dims[d];
            if (n > MAX_ELEMS) die("tensor %s has more than %lld elements", t->name, (long long)MAX_ELEMS);
        }
        t->n = (size_t)n;
        t->data = malloc(sizeof(double) * (t->n ? t->n : 1));
        if (!t->data) die("out of memory reading tensor %s", t->name);
        read_exact(t->data, sizeof(double), t->n, t->name);
        for (int j = 0; j < in->count; j++)
            if (strcmp(in->t[j].name, t->name) == 0) die("tensor %s is given twice", t->name);
        in->count++;
    }
    if (fgetc(stdin) != EOF) die("stdin holds bytes after the %lld tensors it announced", (long long)count);
}

static void write_raw(const void *p, size_t size, size_t count) {
    unsigned char buf[8];
    const unsigned char *b = p;
    for (size_t k = 0; k < count; k++, b += size) {
        memcpy(buf, b, size);
        if (!little_endian()) swap_bytes(buf, size, 1);
        if (fwrite(buf, size, 1, stdout) != 1) die("cannot write to stdout");
    }
}

static void write_tensors(const Tensors *out) {
    int64_t count = out->count;
    write_raw(&count, sizeof count, 1);
    for (int k = 0; k < out->count; k++) {
        const Tensor *t = &out->t[k];
        int64_t len = (int64_t)strlen(t->name), ndim = t->ndim;
        write_raw(&len, sizeof len, 1);
        if (fwrite(t->name, 1, (size_t)len, stdout) != (size_t)len) die("cannot write to stdout");
        write_raw(&ndim, sizeof ndim, 1);
        write_raw(t->dims, sizeof(int64_t), (size_t)t->ndim);
        write_raw(t->data, sizeof(double), t->n);
    }
    if (fflush(stdout) != 0) die("cannot write to stdout");
}

/* -- looking up inputs, making outputs ---------------------------------------------------------- */
static const char *g_case;

static Tensor *find(Tensors *in, const char *name) {
    for (int k = 0; k < in->count; k++)
        if (strcmp(in->t[k].name, name) == 0) return &in->t[k];
    return NULL;
}

static void shape_str(const Tensor *t, char *buf, size_t size) {
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int d = 0; d < t->ndim && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, d ? ", %lld" : "%lld", (long long)t->dims[d]);
    if (used < size) snprintf(buf + used, size - used, t->ndim == 1 ? ",)" : ")");
}

/* the input `name` with ndim dimensions; its dims in dims[] (may be NULL) */
static Tensor *need(Tensors *in, const char *name, int ndim) {
    Tensor *t = find(in, name);
    if (!t) die("case %s needs the tensor %s, which stdin lacks", g_case, name);
    if (t->ndim != ndim) {
        char s[128];
        shape_str(t, s, sizeof s);
        die("case %s: tensor %s has shape %s, expected %d dimension(s)", g_case, name, s, ndim);
    }
    return t;
}

/* the input `name` with the same shape as `like` */
static Tensor *need_like(Tensors *in, const char *name, const Tensor *like) {
    Tensor *t = need(in, name, like->ndim);
    for (int d = 0; d < t->ndim; d++)
        if (t->dims[d] != like->dims[d]) {
            char a[128], b[128];
            shape_str(t, a, sizeof a);
            shape_str(like, b, sizeof b);
            die("case %s: tensor %s has shape %s, expected %s (the shape of %s)", g_case, name, a, b, like->name);
        }
    return t;
}

/* the input `name` of shape (d0[, d1]) */
static Tensor *need_shape(Tensors *in, const char *name, int ndim, int64_t d0, int64_t d1) {
    Tensor *t = need(in, name, ndim);
    if ((ndim >= 1 && t->dims[0] != d0) || (ndim >= 2 && t->dims[1] != d1)) {
        char a[128];
        shape_str(t, a, sizeof a);
        if (ndim == 1) die("case %s: tensor %s has shape %s, expected (%lld,)", g_case, name, a, (long long)d0);
        die("case %s: tensor %s has shape %s, expected (%lld, %lld)", g_case, name, a, (long long)d0, (long long)d1);
    }
    return t;
}

static double *emit(Tensors *out, const char *name, int ndim, const int64_t *dims) {
    if (out->count == MAX_TENSORS) die("too many outputs");
    Tensor *t = &out->t[out->count++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    t->n = 1;
    for (int d = 0; d < ndim; d++) t->n *= (size_t)(t->dims[d] = dims[d]);
    t->data = calloc(t->n ? t->n : 1, sizeof(double));
    if (!t->data) die("out of memory");
    return t->data;
}

static double *emit_like(Tensors *out, const char *name, const Tensor *like) {
    return emit(out, name, like->ndim, like->dims);
}

static double *emit_rows(Tensors *out, const char *name, int64_t B) { return emit(out, name, 1, &B); }

static double *emit_scalar(Tensors *out, const char *name) { return emit(out, name, 0, NULL); }

static int I(int64_t v) { return (int)v; }

/* a 1-D tensor of byte values as a string */
static void tensor_string(Tensors *in, const char *name, char *buf, size_t size) {
    Tensor *t = need(in, name, 1);
    if (t->n + 1 > size) die("case %s: string %s is longer than %zu bytes", g_case, name, size - 1);
    for (size_t k = 0; k < t->n; k++) {
        double v = t->data[k];
        if (!(v >= 1 && v <= 255 && v == floor(v))) die("case %s: %s must hold byte values 1..255", g_case, name);
        buf[k] = (char)(int)v;
    }
    buf[t->n] = '\0';
}

/* -- the cases ---------------------------------------------------------------------------------- */
typedef void (*CaseFn)(Tensors *in, Tensors *out, const void *arg);
typedef struct { const char *name; CaseFn run; const void *arg; } Case;

static void case_linear(Tensors *in, Tensors *out, const void *arg) {
    int relu = arg != NULL;
    Tensor *x = need(in, "x", 2), *W = need(in, "W", 2);
    W = need_shape(in, "W", 2, x->dims[1], W->dims[1]);
    Tensor *b = need_shape(in, "b", 1, W->dims[1], 0), *dy = need_shape(in, "dy", 2, x->dims[0], W->dims[1]);
    int B = I(x->dims[0]), n_in = I(x->dims[1]), n_out = I(W->dims[1]);
    double *y = emit_like(out, "output/y", dy);
    linear_forward(x->data, W->data, b->data, y, B, n_in, n_out);
    double *dh = dy->data, *masked = NULL;
    if (relu) {  /* linear_relu: y = max(x @ W + b, 0); dh = dy * [y > 0], then linear_backward */
        activation_forward(ACT_RELU, y, y, dy->n);
        masked = malloc(sizeof(double) * dy->n);
        if (!masked) die("out of memory");
        activation_backward(ACT_RELU, dy->data, NULL, y, masked, dy->n);
        dh = masked;
    }
    linear_backward(dh, x->data, W->data, emit_like(out, "grad/x", x), emit_like(out, "grad/W", W),
                    emit_like(out, "grad/b", b), B, n_in, n_out);
    free(masked);
}

static void case_masked_linear(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *x = need(in, "x", 2), *W = need(in, "W", 2);
    W = need_shape(in, "W", 2, x->dims[1], W->dims[1]);
    Tensor *M = need_like(in, "M", W), *b = need_shape(in, "b", 1, W->dims[1], 0);
    Tensor *dy = need_shape(in, "dy", 2, x->dims[0], W->dims[1]);
    int B = I(x->dims[0]), n_in = I(x->dims[1]), n_out = I(W->dims[1]);
    masked_linear_forward(x->data, W->data, M->data, b->data, emit_like(out, "output/y", dy), B, n_in, n_out);
    masked_linear_backward(dy->data, x->data, W->data, M->data, emit_like(out, "grad/x", x),
                           emit_like(out, "grad/W", W), emit_like(out, "grad/b", b), B, n_in, n_out);
}

static const Activation A_IDENTITY = ACT_IDENTITY, A_RELU = ACT_RELU, A_LEAKY = ACT_LEAKY_RELU, A_TANH = ACT_TANH,
                        A_SIGMOID = ACT_SIGMOID, A_SOFTPLUS = ACT_SOFTPLUS, A_ELU = ACT_ELU;

static void case_activation(Tensors *in, Tensors *out, const void *arg) {
    Activation a = *(const Activation *)arg;
    Tensor *x = need(in, "x", 2), *dy = need_like(in, "dy", x);
    double *y = emit_like(out, "output/y", x);
    activation_forward(a, x->data, y, x->n);
    activation_backward(a, dy->data, x->data, y, emit_like(out, "grad/x", x), x->n);
}

static void case_bernoulli_nll(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *l = need(in, "logits", 2), *x = need_like(in, "x", l), *dy = need_shape(in, "dy", 1, l->dims[0], 0);
    int B = I(l->dims[0]), D = I(l->dims[1]);
    bernoulli_nll_forward(l->data, x->data, emit_rows(out, "output/loss", B), B, D);
    bernoulli_nll_backward(dy->data, l->data, x->data, emit_like(out, "grad/logits", l), B, D);
}

static void case_gaussian_nll(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *mu = need(in, "mu", 2), *x = need_like(in, "x", mu), *dy = need_shape(in, "dy", 1, mu->dims[0], 0);
    Tensor *lv = find(in, "logvar");
    int B = I(mu->dims[0]), D = I(mu->dims[1]);
    if (!lv) die("case %s needs the tensor logvar, which stdin lacks", g_case);
    if (!(lv->ndim == 0 || (lv->ndim == 1 && lv->dims[0] == D) || (lv->ndim == 2 && lv->dims[0] == B
                                                                  && lv->dims[1] == D)))
        die("case %s: logvar must be a scalar, (D,) or (B, D) for mu (%d, %d)", g_case, B, D);
    gaussian_nll_forward(mu->data, x->data, lv->data, lv->n, emit_rows(out, "output/loss", B), B, D);
    gaussian_nll_backward(dy->data, mu->data, x->data, lv->data, lv->n, emit_like(out, "grad/mu", mu),
                          emit_like(out, "grad/logvar", lv), B, D);
}

static void case_mse(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *p = need(in, "pred", 2), *t = need_like(in, "target", p), *dy = need(in, "dy", 0);
    *emit_scalar(out, "output/loss") = mse_forward(p->data, t->data, p->n);
    mse_backward(dy->data[0], p->data, t->data, emit_like(out, "grad/pred", p), p->n);
}

static void case_logsumexp(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *a = need(in, "a", 2), *dy = need_shape(in, "dy", 1, a->dims[0], 0);
    int B = I(a->dims[0]), C = I(a->dims[1]);
    double *y = emit_rows(out, "output/y", B);
    logsumexp_forward(a->data, y, B, C);
    logsumexp_backward(dy->data, a->data, y, emit_like(out, "grad/a", a), B, C);
}

static void case_reparameterize(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *mu = need(in, "mu", 2), *lv = need_like(in, "logvar", mu), *eps = find(in, "eps");
    if (!eps) die("case %s needs the tensor eps, which stdin lacks", g_case);
    int K = eps->ndim == 3 ? I(eps->dims[0]) : 1;
    if (!((eps->ndim == 2 || eps->ndim == 3) && eps->dims[eps->ndim - 2] == mu->dims[0]
          && eps->dims[eps->ndim - 1] == mu->dims[1]))
        die("case %s: eps must be (B, Z) or (K, B, Z) with (B, Z) the shape of mu", g_case);
    Tensor *dy = need_like(in, "dy", eps);
    reparameterize_forward(mu->data, lv->data, eps->data, emit_like(out, "output/z", eps), K, I(mu->n));
    reparameterize_backward(dy->data, lv->data, eps->data, emit_like(out, "grad/mu", mu),
                            emit_like(out, "grad/logvar", lv), K, I(mu->n));
}

static void case_kl_std_normal(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *mu = need(in, "mu", 2), *lv = need_like(in, "logvar", mu), *dy = need_shape(in, "dy", 1, mu->dims[0], 0);
    int B = I(mu->dims[0]), Z = I(mu->dims[1]);
    kl_std_normal_forward(mu->data, lv->data, emit_rows(out, "output/kl", B), B, Z);
    kl_std_normal_backward(dy->data, mu->data, lv->data, emit_like(out, "grad/mu", mu),
                           emit_like(out, "grad/logvar", lv), B, Z);
}

static const double FREE_BITS = 0.3;  /* the kl_free_bits case's L */

static void case_kl_free_bits(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *mu = need(in, "mu", 2), *lv = need_like(in, "logvar", mu), *dy = need(in, "dy", 0);
    int B = I(mu->dims[0]), Z = I(mu->dims[1]);
    *emit_scalar(out, "output/kl") = kl_free_bits_forward(mu->data, lv->data, FREE_BITS, B, Z);
    kl_free_bits_backward(dy->data[0], mu->data, lv->data, FREE_BITS, emit_like(out, "grad/mu", mu),
                          emit_like(out, "grad/logvar", lv), B, Z);
}

enum { SM_SOFTMAX, SM_LOG_SOFTMAX, SM_CE, SM_ENTROPY, SM_EXPECTATION };
static const int K_SOFTMAX = SM_SOFTMAX, K_LOG_SOFTMAX = SM_LOG_SOFTMAX, K_CE = SM_CE, K_ENTROPY = SM_ENTROPY,
                 K_EXPECTATION = SM_EXPECTATION;

static void case_categorical(Tensors *in, Tensors *out, const void *arg) {
    int kind = *(const int *)arg;
    Tensor *s = need(in, "logits", 2);
    int B = I(s->dims[0]), C = I(s->dims[1]);
    double *ds = NULL;
    if (kind == SM_SOFTMAX || kind == SM_LOG_SOFTMAX) {
        Tensor *dy = need_like(in, "dy", s);
        double *y = emit_like(out, kind == SM_SOFTMAX ? "output/q" : "output/y", s);
        ds = emit_like(out, "grad/logits", s);
        if (kind == SM_SOFTMAX) {
            softmax_forward(s->data, y, B, C);
            softmax_backward(dy->data, y, ds, B, C);
        } else {
            log_softmax_forward(s->data, y, B, C);
            log_softmax_backward(dy->data, y, ds, B, C);
        }
        return;
    }
    Tensor *dy = need_shape(in, "dy", 1, B, 0);
    ds = emit_like(out, "grad/logits", s);
    if (kind == SM_CE) {
        Tensor *lab = need_shape(in, "labels", 1, B, 0);
        long *labels = malloc(sizeof(long) * (size_t)(B ? B : 1));
        if (!labels) die("out of memory");
        for (int r = 0; r < B; r++) {
            double v = lab->data[r];
            if (!(v >= 0 && v < C && v == floor(v))) die("case %s: labels[%d] = %g is not an integer in [0, %d)",
                                                         g_case, r, v, C);
            labels[r] = (long)v;
        }
        softmax_ce_forward(s->data, labels, emit_rows(out, "output/loss", B), B, C);
        softmax_ce_backward(dy->data, s->data, labels, ds, B, C);
        free(labels);
    } else if (kind == SM_ENTROPY) {
        softmax_entropy_forward(s->data, emit_rows(out, "output/H", B), B, C);
        softmax_entropy_backward(dy->data, s->data, ds, B, C);
    } else {
        Tensor *v = need_like(in, "v", s);
        softmax_expectation_forward(s->data, v->data, emit_rows(out, "output/y", B), B, C);
        softmax_expectation_backward(dy->data, s->data, v->data, ds, emit_like(out, "grad/v", v), B, C);
    }
}

static void case_prior(Tensors *in, Tensors *out, const void *arg) {
    int logistic = arg != NULL;
    Tensor *z = need(in, "z", 2), *dy = need_shape(in, "dy", 1, z->dims[0], 0);
    int B = I(z->dims[0]), D = I(z->dims[1]);
    double *logp = emit_rows(out, "output/logp", B), *dz = emit_like(out, "grad/z", z);
    if (logistic) {
        logistic_logprob_forward(z->data, logp, B, D);
        logistic_logprob_backward(dy->data, z->data, dz, B, D);
    } else {
        gaussian_logprob_forward(z->data, logp, B, D);
        gaussian_logprob_backward(dy->data, z->data, dz, B, D);
    }
}

static const ScaleClamp C_TANH = CLAMP_TANH, C_ATAN = CLAMP_ATAN, C_NONE = CLAMP_NONE;
static const double CLAMP_BOUND = 1.7;  /* the scale_clamp cases' b */

static void case_scale_clamp(Tensors *in, Tensors *out, const void *arg) {
    ScaleClamp kind = *(const ScaleClamp *)arg;
    Tensor *raw = need(in, "raw", 2), *dy = need_like(in, "dy", raw);
    double *s = emit_like(out, "output/s", raw);
    scale_clamp_forward(raw->data, s, raw->n, kind, CLAMP_BOUND);
    scale_clamp_backward(dy->data, raw->data, s, emit_like(out, "grad/raw", raw), raw->n, kind, CLAMP_BOUND);
}

static void case_affine_coupling_half(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *xb = need(in, "xb", 2), *s = need_like(in, "s", xb), *t = need_like(in, "t", xb);
    Tensor *dyb = need_like(in, "dyb", xb), *dld = need_shape(in, "dlogdet", 1, xb->dims[0], 0);
    int B = I(xb->dims[0]), nb = I(xb->dims[1]);
    affine_coupling_forward(xb->data, s->data, t->data, emit_like(out, "output/yb", xb),
                            emit_rows(out, "output/logdet", B), B, nb);
    affine_coupling_backward(dyb->data, dld->data, xb->data, s->data, emit_like(out, "grad/xb", xb),
                             emit_like(out, "grad/s", s), emit_like(out, "grad/t", t), B, nb);
}

static void case_affine_coupling_half_inverse(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *yb = need(in, "yb", 2), *s = need_like(in, "s", yb), *t = need_like(in, "t", yb);
    Tensor *dxb = need_like(in, "dxb", yb), *dld = need_shape(in, "dlogdet_inv", 1, yb->dims[0], 0);
    int B = I(yb->dims[0]), nb = I(yb->dims[1]);
    double *xb = emit_like(out, "output/xb", yb);
    affine_coupling_inverse(yb->data, s->data, t->data, xb, emit_rows(out, "output/logdet_inv", B), B, nb);
    affine_coupling_inverse_backward(dxb->data, dld->data, xb, s->data, emit_like(out, "grad/yb", yb),
                                     emit_like(out, "grad/s", s), emit_like(out, "grad/t", t), B, nb);
}

static void case_diag_scale(Tensors *in, Tensors *out, const void *arg) {
    int inverse = arg != NULL;
    Tensor *a = need(in, inverse ? "y" : "x", 2), *ls = need_shape(in, "log_scale", 1, a->dims[1], 0);
    Tensor *da = need_like(in, inverse ? "dx" : "dy", a);
    Tensor *dld = need_shape(in, inverse ? "dlogdet_inv" : "dlogdet", 1, a->dims[0], 0);
    int B = I(a->dims[0]), D = I(a->dims[1]);
    if (!inverse) {
        double *y = emit_like(out, "output/y", a);
        diag_scale_forward(a->data, ls->data, y, emit_rows(out, "output/logdet", B), B, D);
        diag_scale_backward(da->data, dld->data, a->data, ls->data, emit_like(out, "grad/x", a),
                            emit_like(out, "grad/log_scale", ls), B, D);
    } else {
        double *x = emit_like(out, "output/x", a);
        diag_scale_inverse(a->data, ls->data, x, emit_rows(out, "output/logdet_inv", B), B, D);
        diag_scale_inverse_backward(da->data, dld->data, x, ls->data, emit_like(out, "grad/y", a),
                                    emit_like(out, "grad/log_scale", ls), B, D);
    }
}

static const double LOGIT_ALPHA = 0.05;  /* the logit cases' alpha */

static void case_logit(Tensors *in, Tensors *out, const void *arg) {
    int inverse = arg != NULL;
    Tensor *a = need(in, inverse ? "y" : "x", 2), *da = need_like(in, inverse ? "dx" : "dy", a);
    Tensor *dld = need_shape(in, inverse ? "dlogdet_inv" : "dlogdet", 1, a->dims[0], 0);
    int B = I(a->dims[0]), D = I(a->dims[1]);
    if (!inverse) {
        logit_forward(a->data, emit_like(out, "output/y", a), emit_rows(out, "output/logdet", B), B, D, LOGIT_ALPHA);
        logit_backward(da->data, dld->data, a->data, emit_like(out, "grad/x", a), B, D, LOGIT_ALPHA);
    } else {
        logit_inverse(a->data, emit_like(out, "output/x", a), emit_rows(out, "output/logdet_inv", B), B, D,
                      LOGIT_ALPHA);
        logit_inverse_backward(da->data, dld->data, a->data, emit_like(out, "grad/y", a), B, D, LOGIT_ALPHA);
    }
}

/* the conv cases' geometry: stride (2, 1), padding (1, 2), dilation (1, 2) */
static const ConvGeometry CONV = {2, 1, 1, 2, 1, 2};

static void case_conv2d(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *x = need(in, "x", 4), *W = need(in, "W", 4);
    if (W->dims[1] != x->dims[1]) die("case %s: W (O, C, kh, kw) must have C = %lld", g_case, (long long)x->dims[1]);
    Tensor *b = need_shape(in, "b", 1, W->dims[0], 0);
    int B = I(x->dims[0]), C = I(x->dims[1]), H = I(x->dims[2]), Wd = I(x->dims[3]);
    int O = I(W->dims[0]), kh = I(W->dims[2]), kw = I(W->dims[3]);
    int Ho = (H + 2 * CONV.ph - CONV.dh * (kh - 1) - 1) / CONV.sh + 1;
    int Wo = (Wd + 2 * CONV.pw - CONV.dw * (kw - 1) - 1) / CONV.sw + 1;
    int64_t ydims[4] = {B, O, Ho, Wo};
    Tensor *dy = need(in, "dy", 4);
    for (int d = 0; d < 4; d++)
        if (dy->dims[d] != ydims[d]) die("case %s: dy must have shape (%d, %d, %d, %d)", g_case, B, O, Ho, Wo);
    conv2d_forward(x->data, W->data, b->data, emit(out, "output/y", 4, ydims), B, C, H, Wd, O, kh, kw, CONV, Ho, Wo);
    conv2d_backward(dy->data, x->data, W->data, emit_like(out, "grad/x", x), emit_like(out, "grad/W", W),
                    emit_like(out, "grad/b", b), B, C, H, Wd, O, kh, kw, CONV, Ho, Wo);
}

/* The adjoint of conv2d in its input, plus a bias: x (B, C, H, W), W (C, O, kh, kw), b (O,) ->
 * y (B, O, Hy, Wy), Hy = (H - 1) s - 2p + d (kh - 1) + 1 (no output padding): y = conv2d's dx for dy = x,
 * with conv2d's weight W (C, O, kh, kw) read as (O_conv = C, C_conv = O). Its backward: dx = conv2d(dy)
 * (the adjoint of the adjoint), dW = conv2d's dW with the roles of x and dy swapped, db = sum dy. */
static void case_conv_transpose2d(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *x = need(in, "x", 4), *W = need(in, "W", 4);
    if (W->dims[0] != x->dims[1]) die("case %s: W (C, O, kh, kw) must have C = %lld", g_case, (long long)x->dims[1]);
    Tensor *b = need_shape(in, "b", 1, W->dims[1], 0);
    int B = I(x->dims[0]), C = I(x->dims[1]), H = I(x->dims[2]), Wd = I(x->dims[3]);
    int O = I(W->dims[1]), kh = I(W->dims[2]), kw = I(W->dims[3]);
    int Hy = (H - 1) * CONV.sh - 2 * CONV.ph + CONV.dh * (kh - 1) + 1;
    int Wy = (Wd - 1) * CONV.sw - 2 * CONV.pw + CONV.dw * (kw - 1) + 1;
    int64_t ydims[4] = {B, O, Hy, Wy};
    Tensor *dy = need(in, "dy", 4);
    for (int d = 0; d < 4; d++)
        if (dy->dims[d] != ydims[d]) die("case %s: dy must have shape (%d, %d, %d, %d)", g_case, B, O, Hy, Wy);
    /* conv2d with input y-shaped (B, O, Hy, Wy), weight W as (C, O, kh, kw), output x-shaped (B, C, H, W) */
    double *y = emit(out, "output/y", 4, ydims);
    conv2d_backward(x->data, NULL, W->data, y, NULL, NULL, B, O, Hy, Wy, C, kh, kw, CONV, H, Wd);
    for (int n = 0; n < B; n++)
        for (int o = 0; o < O; o++)
            for (size_t k = 0; k < (size_t)Hy * Wy; k++) y[((size_t)n * O + o) * Hy * Wy + k] += b->data[o];
    double *dx = emit_like(out, "grad/x", x), *dW = emit_like(out, "grad/W", W), *db = emit_like(out, "grad/b", b);
    conv2d_forward(dy->data, W->data, NULL, dx, B, O, Hy, Wy, C, kh, kw, CONV, H, Wd);
    conv2d_backward(x->data, dy->data, W->data, NULL, dW, NULL, B, O, Hy, Wy, C, kh, kw, CONV, H, Wd);
    for (int n = 0; n < B; n++)
        for (int o = 0; o < O; o++)
            for (size_t k = 0; k < (size_t)Hy * Wy; k++) db[o] += dy->data[((size_t)n * O + o) * Hy * Wy + k];
}

static void case_squeeze(Tensors *in, Tensors *out, const void *arg) {
    int un = arg != NULL, f = 2;
    Tensor *x = need(in, "x", 4), *dy = need(in, "dy", 4);
    /* squeeze: (B, C, H, W) -> (B, 4C, H/2, W/2); unsqueeze the reverse. big = the (B, C, H, W) side */
    const Tensor *big = un ? dy : x, *small = un ? x : dy;
    int B = I(big->dims[0]), C = I(big->dims[1]), H = I(big->dims[2]), W = I(big->dims[3]);
    if (H % f || W % f || small->dims[0] != B || small->dims[1] != (int64_t)C * f * f || small->dims[2] != H / f
        || small->dims[3] != W / f)
        die("case %s: x and dy are not a (B, C, H, W) / (B, 4C, H/2, W/2) pair", g_case);
    if (!un) {
        squeeze_forward(x->data, emit_like(out, "output/y", dy), B, C, H, W, f);
        unsqueeze_forward(dy->data, emit_like(out, "grad/x", x), B, C, H, W, f);
    } else {
        unsqueeze_forward(x->data, emit_like(out, "output/y", dy), B, C, H, W, f);
        squeeze_forward(dy->data, emit_like(out, "grad/x", x), B, C, H, W, f);
    }
}

/* adam_step: p, g1, g2, g3 (n,) -> p, m, v after three steps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8 */
static void case_adam_step(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    Tensor *p = need(in, "p", 1), *g[3] = {need_like(in, "g1", p), need_like(in, "g2", p), need_like(in, "g3", p)};
    double *pn = emit_like(out, "output/p", p);
    Adam opt = {1e-2, 0.9, 0.999, 1e-8, 0, emit_like(out, "output/m", p), emit_like(out, "output/v", p), p->n};
    memcpy(pn, p->data, sizeof(double) * p->n);
    for (int s = 0; s < 3; s++) adam_step(&opt, pn, g[s]->data);
}

/* the VAE config from the vae_bernoulli inputs (hidden, beta, activation, likelihood; x and eps give x_dim,
 * z_dim), checked against params */
static VAEConfig vae_config(Tensors *in) {
    char act[64], lik[64];
    VAEConfig c = {0};
    Tensor *x = need(in, "x", 2), *eps = need(in, "eps", 3), *hidden = need(in, "hidden", 1);
    Tensor *beta = need(in, "beta", 0), *params = need(in, "params", 1);
    tensor_string(in, "activation", act, sizeof act);
    tensor_string(in, "likelihood", lik, sizeof lik);
    if (strcmp(lik, "bernoulli") != 0) die("case %s: likelihood %s is not ported (only bernoulli)", g_case, lik);
    if (activation_by_name(act) < 0) die("case %s: unknown activation %s", g_case, act);
    if (hidden->n > VAE_MAX_LAYERS) die("case %s: more than %d hidden layers", g_case, VAE_MAX_LAYERS);
    c.act = (Activation)activation_by_name(act);
    c.beta = beta->data[0];
    c.x_dim = I(x->dims[1]);
    c.z_dim = I(eps->dims[2]);
    c.n_hidden = (int)hidden->n;
    for (int l = 0; l < c.n_hidden; l++) {
        double h = hidden->data[l];
        if (!(h >= 1 && h <= 1 << 20 && h == floor(h))) die("case %s: hidden[%d] = %g is not a size", g_case, l, h);
        c.hidden[l] = (int)h;
    }
    if (eps->dims[1] != x->dims[0]) die("case %s: eps (K, B, Z) must have B = %lld rows", g_case,
                                        (long long)x->dims[0]);
    size_t P = vae_num_params(&c);
    if (params->n != P) die("case %s: params has %zu entries, the VAE's layout %zu", g_case, params->n, P);
    return c;
}

static void case_vae_bernoulli(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    VAEConfig c = vae_config(in);
    Tensor *x = need(in, "x", 2), *eps = need(in, "eps", 3), *params = need(in, "params", 1);
    size_t P = params->n;
    double *grads = malloc(sizeof(double) * P);
    VAETerms terms;
    if (!grads || vae_loss_and_grad(&c, params->data, x->data, eps->data, I(x->dims[0]), I(eps->dims[0]), grads,
                                    &terms) != 0)
        die("out of memory");
    *emit_scalar(out, "output/loss") = terms.loss;
    *emit_scalar(out, "output/recon") = terms.recon;
    *emit_scalar(out, "output/kl") = terms.kl;
    *emit_scalar(out, "output/nelbo") = terms.nelbo;
    for (int i = 0;; i++) {
        char name[64], key[80];
        int shape[2];
        size_t offset;
        int nd = vae_param_info(&c, i, name, sizeof name, shape, &offset);
        if (nd < 0) break;
        int64_t dims[2] = {shape[0], shape[1]};
        snprintf(key, sizeof key, "grad/%s", name);
        memcpy(emit(out, key, nd, dims), grads + offset, sizeof(double) * (size_t)shape[0] * shape[1]);
    }
    free(grads);
}

/* vae_bernoulli_train (not a reference case): the vae_bernoulli inputs plus steps and lr (0-d); that many
 * training steps (vae_train_step: the gradient at the same x and eps, then Adam with betas (0.9, 0.999),
 * eps 1e-8) -> output/loss (steps,) (each step's loss before its update) and output/params (the flat buffer
 * after the last step) */
static void case_vae_bernoulli_train(Tensors *in, Tensors *out, const void *arg) {
    (void)arg;
    VAEConfig c = vae_config(in);
    Tensor *x = need(in, "x", 2), *eps = need(in, "eps", 3), *params = need(in, "params", 1);
    double steps = need(in, "steps", 0)->data[0], lr = need(in, "lr", 0)->data[0];
    if (!(steps >= 1 && steps <= 1e6 && steps == floor(steps))) die("case %s: steps must be a count >= 1", g_case);
    if (!(lr > 0 && isfinite(lr))) die("case %s: lr must be a positive number", g_case);
    int64_t n_steps = (int64_t)steps;
    double *losses = emit(out, "output/loss", 1, &n_steps), *p = emit_like(out, "output/params", params);
    double *grads = calloc(params->n, sizeof(double)), *m = calloc(params->n, sizeof(double));
    double *v = calloc(params->n, sizeof(double));
    if (!grads || !m || !v) die("out of memory");
    memcpy(p, params->data, sizeof(double) * params->n);
    Adam opt = {lr, 0.9, 0.999, 1e-8, 0, m, v, params->n};
    for (int64_t s = 0; s < n_steps; s++) {
        VAETerms terms;
        if (vae_train_step(&c, p, grads, &opt, x->data, eps->data, I(x->dims[0]), I(eps->dims[0]), &terms) != 0)
            die("out of memory");
        losses[s] = terms.loss;
    }
    free(grads);
    free(m);
    free(v);
}

static const Case CASES[] = {
    {"linear", case_linear, NULL},
    {"linear_relu", case_linear, "relu"},
    {"masked_linear", case_masked_linear, NULL},
    {"identity", case_activation, &A_IDENTITY},
    {"relu", case_activation, &A_RELU},
    {"leaky_relu", case_activation, &A_LEAKY},
    {"tanh", case_activation, &A_TANH},
    {"sigmoid", case_activation, &A_SIGMOID},
    {"softplus", case_activation, &A_SOFTPLUS},
    {"elu", case_activation, &A_ELU},
    {"bernoulli_nll", case_bernoulli_nll, NULL},
    {"bernoulli_nll_saturated", case_bernoulli_nll, NULL},
    {"gaussian_nll", case_gaussian_nll, NULL},
    {"gaussian_nll_scalar", case_gaussian_nll, NULL},
    {"gaussian_nll_per_elem", case_gaussian_nll, NULL},
    {"mse", case_mse, NULL},
    {"logsumexp", case_logsumexp, NULL},
    {"reparameterize", case_reparameterize, NULL},
    {"reparameterize_samples", case_reparameterize, NULL},
    {"kl_std_normal", case_kl_std_normal, NULL},
    {"kl_free_bits", case_kl_free_bits, NULL},
    {"softmax", case_categorical, &K_SOFTMAX},
    {"log_softmax", case_categorical, &K_LOG_SOFTMAX},
    {"softmax_ce", case_categorical, &K_CE},
    {"softmax_entropy", case_categorical, &K_ENTROPY},
    {"softmax_expectation", case_categorical, &K_EXPECTATION},
    {"prior_gaussian", case_prior, NULL},
    {"prior_logistic", case_prior, "logistic"},
    {"scale_clamp_tanh", case_scale_clamp, &C_TANH},
    {"scale_clamp_atan", case_scale_clamp, &C_ATAN},
    {"scale_clamp_none", case_scale_clamp, &C_NONE},
    {"affine_coupling_half", case_affine_coupling_half, NULL},
    {"affine_coupling_half_inverse", case_affine_coupling_half_inverse, NULL},
    {"diag_scale", case_diag_scale, NULL},
    {"diag_scale_inverse", case_diag_scale, "inverse"},
    {"logit", case_logit, NULL},
    {"logit_inverse", case_logit, "inverse"},
    {"conv2d", case_conv2d, NULL},
    {"conv_transpose2d", case_conv_transpose2d, NULL},
    {"squeeze", case_squeeze, NULL},
    {"unsqueeze", case_squeeze, "un"},
    {"adam_step", case_adam_step, NULL},
    {"vae_bernoulli", case_vae_bernoulli, NULL},
    {"vae_bernoulli_train", case_vae_bernoulli_train, NULL},
};

int main(int argc, char **argv) {
    size_t n_cases = sizeof CASES / sizeof CASES[0];
    if (argc == 2 && strcmp(argv[1], "--list") == 0) {
        for (size_t k = 0; k < n_cases; k++) printf("%s\n", CASES[k].name);
        return 0;
    }
    if (argc != 2 || argv[1][0] == '-') die("usage: %s CASE < in.bin > out.bin   (or --list)", argv[0]);
    for (size_t k = 0; k < n_cases; k++)
        if (strcmp(argv[1], CASES[k].name) == 0) {
            Tensors *in = calloc(1, sizeof(Tensors)), *out = calloc(1, sizeof(Tensors));
            if (!in || !out) die("out of memory");
            g_case = CASES[k].name;
            read_tensors(in);
            CASES[k].run(in, out, CASES[k].arg);
            write_tensors(out);
            for (int i = 0; i < in->count; i++) free(in->t[i].data);
            for (int i = 0; i < out->count; i++) free(out->t[i].data);
            free(in);
            free(out);
            return 0;
        }
    die("unknown case %s (%s --list names the ported ones)", argv[1], argv[0]);
    return 2;
}
