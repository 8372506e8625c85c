"""The three benchmark workloads, identical in every backend (float32, Adam lr 1e-3).

    vae        784-400-20 ReLU encoder/decoder, Bernoulli decoder + closed-form KL, batch 128
    nice       784 dims, 4 additive couplings, coupling MLP 392-1000x5(ReLU)-392, diagonal
               scaling, logistic prior, batch 200
    realnvp2d  2-D, 8 affine couplings, s/t MLP 1-256-256-2, tanh-bounded scale, Gaussian prior,
               batch 512
    convvae    VAE(arch="conv"): 1x28x28 -> 4x4 stride-2 convs 32, 64 -> Linear to 2 x 20; Linear, 4x4
               stride-2 transposed convs 64 -> 32 -> 1; Bernoulli decoder + closed-form KL, batch 128
    glow       Glow on 1x28x28 (``npdgm train glow``'s defaults): 2 levels x 4 steps of ActNorm, invertible
               1x1 convolution (LU), affine coupling with conv net 3x3-1x1-3x3, 32 channels; batch 64

A workload builds a *runner* per backend: ``runner.step()`` is one full training step
(zero grads, forward, backward, Adam update) on the next pre-built batch; ``runner.loss()`` is
the loss of the last step (a host float, read outside the timed region). The npdgm runner calls
the library model's own ``loss_and_grad`` and ``npdgm.optim.Adam``; the torch runner calls the
eager mirror in :mod:`npdgm.bench.torch_models` with ``torch.optim.Adam``.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .gemm import linear_products

LR = 1e-3
N_BATCHES = 4  # distinct batches cycled through (same data for every backend)


class Workload:
    name = ""
    batch = 0
    description = ""

    def layers(self):
        """[(in, out, need_dx)] of every Linear layer in one step (for the GEMM floor)."""
        raise NotImplementedError

    def products(self, batch):
        """Counter of the (m, k, n, layout) matrix products of one step (the GEMM floor)."""
        return linear_products(batch, self.layers())

    def data(self, n, seed=0):
        """(n, D) float32 host array of training data."""
        raise NotImplementedError

    def noise_shape(self, batch):
        """Shape of the per-step noise array (None when the loss takes no noise)."""
        return None

    def build_npdgm(self, seed):
        """The library model (float32, current backend) for this workload."""
        raise NotImplementedError

    def build_torch(self, seed):
        raise NotImplementedError

    def torch_loss(self, model, x, eps):
        return model.loss(x, eps) if eps is not None else model.loss(x)

    def batches(self, batch, seed=0):
        """``N_BATCHES`` host float32 batches of ``batch`` rows (rows repeat when data runs out)."""
        x = self.data(max(batch * N_BATCHES, 1), seed)
        return [np.ascontiguousarray(x[i * batch:(i + 1) * batch]) for i in range(N_BATCHES)]


def _mnist(n, seed):
    from npdgm.data import load_mnist

    x, _ = load_mnist("train", limit=min(n, 10_000))
    if x.shape[0] < n:
        x = np.concatenate([x] * (n // x.shape[0] + 1))[:n]
    return x.astype(np.float32)


def _dequantized_mnist(n, seed):
    """MNIST pixels (x 255 + u) / 256, u ~ U(0, 1) drawn once (seeded): the flows' training data."""
    rng = np.random.default_rng(seed)
    x = _mnist(n, seed)
    return ((x * 255 + rng.uniform(0, 1, x.shape)) / 256).astype(np.float32)


class VAEWorkload(Workload):
    name, batch = "vae", 128
    description = "VAE 784-400-20 ReLU, Bernoulli decoder (BCE from logits) + closed-form KL"
    x_dim, hidden, z_dim = 784, 400, 20

    def layers(self):
        X, H, Z = self.x_dim, self.hidden, self.z_dim
        return [(X, H, False), (H, 2 * Z, True), (Z, H, True), (H, X, True)]

    def data(self, n, seed=0):
        return _mnist(n, seed)

    def noise_shape(self, batch):
        return (batch, self.z_dim)

    def build_npdgm(self, seed):
        from .npdgm_models import build_vae

        return build_vae(self.x_dim, self.hidden, self.z_dim, seed)

    def build_torch(self, seed):
        from .torch_models import VAE

        return VAE(self.x_dim, (self.hidden,), self.z_dim)


class NICEWorkload(Workload):
    name, batch = "nice", 200
    description = "NICE 784-d, 4 additive couplings, MLP 392-1000x5-392 ReLU, diagonal scaling, logistic prior"
    dim, n_couplings, hidden, n_hidden = 784, 4, 1000, 5

    def layers(self):
        half, H = self.dim // 2, self.hidden
        out = []
        for i in range(self.n_couplings):
            sizes = [half, *[H] * self.n_hidden, self.dim - half]
            for j in range(len(sizes) - 1):
                out.append((sizes[j], sizes[j + 1], not (i == 0 and j == 0)))
        return out

    def data(self, n, seed=0):
        return _dequantized_mnist(n, seed)

    def build_npdgm(self, seed):
        from .npdgm_models import build_nice

        return build_nice(self.dim, self.n_couplings, self.hidden, self.n_hidden, seed)

    def build_torch(self, seed):
        from .torch_models import NICE

        return NICE(self.dim, self.n_couplings, self.hidden, self.n_hidden)


class RealNVP2dWorkload(Workload):
    name, batch = "realnvp2d", 512
    description = "RealNVP 2-d, 8 affine couplings, s/t MLP 1-256-256-2, tanh-bounded scale, Gaussian prior"
    n_couplings, hidden = 8, 256

    def layers(self):
        H = self.hidden
        out = []
        for i in range(self.n_couplings):
            out += [(1, H, i > 0), (H, H, True), (H, 2, True)]
        return out

    def data(self, n, seed=0):
        from npdgm.data import make_toy2d

        return np.asarray(make_toy2d("moons", n, np.random.default_rng(seed)), dtype=np.float32)

    def build_npdgm(self, seed):
        from .npdgm_models import build_realnvp2d

        return build_realnvp2d(self.n_couplings, self.hidden, seed)

    def build_torch(self, seed):
        from .torch_models import RealNVP2d

        return RealNVP2d(self.n_couplings, self.hidden)


class _ConvRows:
    """A workload whose products are convolutions taken as im2col rows: ``conv_layers()`` ->
    [(rows per image, in, out, need_dx)], each one GEMM of (batch rows, in) @ (in, out) and its backward."""

    def layers(self):
        return [(fin, fout, dx) for _, fin, fout, dx in self.conv_layers()]

    def products(self, batch):
        c = Counter()
        for rows, fin, fout, dx in self.conv_layers():
            c.update(linear_products(batch * rows, [(fin, fout, dx)]))
        return c


class ConvVAEWorkload(_ConvRows, VAEWorkload):
    name, batch = "convvae", 128
    description = ("conv VAE 1x28x28, 4x4 stride-2 convs 32-64 / transposed convs 64-32-1 ReLU, Bernoulli "
                   "decoder + closed-form KL")
    image_shape, channels, z_dim = (1, 28, 28), (32, 64), 20

    def conv_layers(self):
        """[(rows per image, in, out, need_dx)]: each convolution as the one product of its im2col rows
        (kernels.conv: a conv is rows (B Ho Wo, C kh kw) @ (C kh kw, O); a transposed conv (B H W, C) @
        (C, O kh kw)), and the two Linear layers (one row per image)."""
        C, H, W = self.image_shape
        out, c, h, w = [], C, H, W
        for k, ch in enumerate(self.channels):                   # encoder: H -> H / 2 (no dx for the data)
            h, w = h // 2, w // 2
            out.append((h * w, c * 16, ch, k > 0))
            c = ch
        out += [(1, c * h * w, 2 * self.z_dim, True), (1, self.z_dim, c * h * w, True)]
        for ch in [*self.channels[::-1][1:], C]:                 # decoder: H -> 2 H
            out.append((h * w, c, ch * 16, True))
            c, h, w = ch, 2 * h, 2 * w
        return out

    def data(self, n, seed=0):
        """MNIST images, the top-left H x W crop repeated over C channels (a smaller image for tests)."""
        C, H, W = self.image_shape
        if H > 28 or W > 28:
            raise ValueError(f"the convvae workload crops MNIST: image_shape {self.image_shape} exceeds 28x28")
        x = _mnist(n, seed).reshape(-1, 1, 28, 28)[:, :, :H, :W]
        return np.ascontiguousarray(np.repeat(x, C, axis=1).reshape(n, -1))

    def build_npdgm(self, seed):
        from .npdgm_models import build_conv_vae

        return build_conv_vae(self.image_shape, self.channels, self.z_dim, seed)

    def build_torch(self, seed):
        from .torch_models import ConvVAE

        return ConvVAE(self.image_shape, self.channels, self.z_dim)


class GlowWorkload(_ConvRows, Workload):
    name, batch = "glow", 64
    description = ("Glow 1x28x28, 2 levels x 4 steps (ActNorm, 1x1 conv LU, affine coupling conv 3x3-1x1-3x3 "
                   "32 ch), split, Gaussian prior")
    image_shape, levels, depth, hidden = (1, 28, 28), 2, 4, 32

    def conv_layers(self):
        """[(rows per image, in, out, need_dx)]: the products of one step as Linear layers on pixel rows. A k x k
        convolution is im2col rows (B H W, C k k) @ (C k k, O) (kernels.conv); the invertible 1x1 convolution is
        InvertibleLinear on the pixel rows (B H W, C): two products, x @ L1 then @ U1. Every input needs its dx
        (the first layer's input is ActNorm's output, which depends on parameters)."""
        (C, H, W), hid, out = self.image_shape, self.hidden, []
        for level in range(self.levels):
            C, H, W = 4 * C, H // 2, W // 2                        # squeeze
            ca, cb = C // 2, C - C // 2
            for _ in range(self.depth):
                out += [(H * W, C, C, True)] * 2                     # 1x1 conv: a = x L1, y = a U1
                out += [(H * W, ca * 9, hid, True), (H * W, hid, hid, True), (H * W, hid * 9, 2 * cb, True)]
            C //= 2                                                  # split: half the channels leave
        return out

    def data(self, n, seed=0):
        return _dequantized_mnist(n, seed)

    def _flow(self, seed):
        from .npdgm_models import build_glow

        return build_glow(self.image_shape, self.levels, self.depth, self.hidden, seed)

    def build_npdgm(self, seed):
        return self._flow(seed)

    def build_torch(self, seed):
        """The PyTorch peer from npdgm's config (the 1x1 convolutions' permutations and signs) and npdgm's initial
        weights (float32); ActNorm initialises on the first batch in both."""
        from npdgm import backend

        from .torch_models import Glow

        with backend.use("numpy", "float32"):
            flow = self._flow(seed)
        return Glow(flow.config).load(flow.params, initialized=False)


WORKLOADS = {w.name: w for w in (VAEWorkload(), NICEWorkload(), RealNVP2dWorkload(), ConvVAEWorkload(),
                                  GlowWorkload())}


def get_workload(name):
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; expected one of {sorted(WORKLOADS)}") from None


# -- runners ------------------------------------------------------------------------------------
class NpdgmRunner:
    """One training step of the library model: zero grads, loss_and_grad, Adam step.

    ``backend``: "numpy" (the reference wing: ``--accel off``), "numpy-fused" (the fast wing with the fastest
    installed engine: ``--accel auto``, :func:`npdgm.accel.enable`) or "cupy" (the fast wing's CUDA kernels).
    A runner sets the wing's switch to its own state before every step, so a reference and a fast runner
    can share one process."""

    def __init__(self, workload, batch, backend="numpy", seed=0):
        from npdgm import accel
        from npdgm import backend as B
        from npdgm.optim import Adam

        self.accel = accel
        self.engine = accel.enable() if backend != "numpy" else accel.enable("off")   # numba's loops: one thread
        self.accel_state = accel.state()
        if backend == "numpy-fused":
            backend = "numpy"
        B.set_backend(backend)
        B.set_dtype("float32")
        self.xp = B.xp()
        self.sync = B.synchronize
        self.model = workload.build_npdgm(seed)
        self.opt = Adam(self.model, lr=LR)
        self.batches = [B.to_device(b) for b in workload.batches(batch, seed)]
        shape = workload.noise_shape(batch)
        self.noise_rng = np.random.default_rng(seed + 1)
        self.noise_shape = shape
        self.i = 0
        self._loss = None
        from .npdgm_models import loss_and_grad

        self._loss_and_grad = loss_and_grad

    def step(self):
        from npdgm import backend as B

        self.accel.set_state(self.accel_state)
        x = self.batches[self.i % len(self.batches)]
        self.i += 1
        eps = None
        if self.noise_shape is not None:
            eps = B.to_device(self.noise_rng.standard_normal(self.noise_shape, dtype=np.float32))
        self._loss = self._loss_and_grad(self.model, x, eps)
        self.opt.step()

    def enable_cuda_graph(self, warmup=2):
        """Replace :meth:`step` by the replay of a captured CUDA graph of the same step (CuPy only):
        the batch and the noise are copied into static device buffers, then one graph launch runs
        forward, backward and the fused Adam update."""
        from npdgm.accel.cuda import CudaGraphStep

        def dev_step(x, *eps):
            loss = self._loss_and_grad(self.model, x, eps[0] if eps else None)
            self.opt.step()
            return loss

        def noise():
            if self.noise_shape is None:
                return ()
            return (self.noise_rng.standard_normal(self.noise_shape, dtype=np.float32),)

        graph = self.graph = CudaGraphStep(dev_step, (self.batches[0], *noise()), optimizers=[self.opt],
                                           warmup=warmup)

        def step():
            x = self.batches[self.i % len(self.batches)]
            self.i += 1
            self._loss = graph(x, *noise())

        self.step = step
        return self

    def loss(self):
        return float(self._loss)

    def num_parameters(self):
        return self.model.num_parameters()


class TorchRunner:
    """The same step in eager PyTorch with torch.optim.Adam (optionally torch.compile'd loss)."""

    ADAM_IMPLS = ("default", "foreach", "fused")

    def __init__(self, workload, batch, device="cpu", seed=0, compile=False, adam="default"):
        import torch

        if adam not in self.ADAM_IMPLS:
            raise ValueError(f"torch Adam implementation must be one of {self.ADAM_IMPLS}, got {adam!r}")
        torch.manual_seed(seed)
        self.torch, self.device, self.workload = torch, device, workload
        self.model = workload.build_torch(seed).to(device)
        kw = {} if adam == "default" else {adam: True}   # default: torch's own choice for the device
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR, **kw)
        self.batches = [torch.as_tensor(b, device=device) for b in workload.batches(batch, seed)]
        self.noise_shape = workload.noise_shape(batch)
        self.gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.loss_fn = lambda x, eps: workload.torch_loss(self.model, x, eps)
        if compile:
            self.loss_fn = torch.compile(self.loss_fn)
        self.i = 0
        self._loss = None
        if device == "cuda":
            self.sync = torch.cuda.synchronize
        else:
            self.sync = lambda: None

    def step(self):
        torch = self.torch
        x = self.batches[self.i % len(self.batches)]
        self.i += 1
        eps = None
        if self.noise_shape is not None:
            eps = torch.randn(self.noise_shape, generator=self.gen, device=self.device)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x, eps)
        loss.backward()
        self.opt.step()
        self._loss = loss.detach()

    def loss(self):
        return float(self._loss)

    def num_parameters(self):
        return sum(p.numel() for p in self.model.parameters())
