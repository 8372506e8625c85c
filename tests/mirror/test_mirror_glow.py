"""Glow against a plain-PyTorch twin (F.pixel_unshuffle, F.conv2d, autograd) holding the same weights: the mean
NLL and every parameter gradient agree at relative 1e-8 in float64. Skipped without PyTorch."""
import math

import numpy as np
import pytest

from npdgm.models import flows as NF

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_glow_logprob(flow, P, x):
    """log p(x) (B,) of ``flow``'s layer stack written with PyTorch ops, parameters from the dict P of tensors."""
    h, logdet = x, torch.zeros(x.shape[0], dtype=x.dtype)
    for i, layer in enumerate(flow.layers):
        C, H, W = layer.image_shape
        img, rest = h[:, :layer.n].reshape(-1, C, H, W), h[:, layer.n:]
        if isinstance(layer, NF.Squeeze):
            img = F.pixel_unshuffle(img, 2)
        elif isinstance(layer, NF.ChannelActNorm):
            img = (img + P[f"{i}.loc"][:, None, None]) * torch.exp(P[f"{i}.log_scale"])[:, None, None]
            logdet = logdet + H * W * P[f"{i}.log_scale"].sum()
        elif isinstance(layer, NF.InvertibleConv1x1):
            L, U, log_s = P[f"{i}.lin.L"], P[f"{i}.lin.U"], P[f"{i}.lin.log_s"]
            perm = torch.zeros(C, C, dtype=x.dtype)
            perm[torch.as_tensor(layer.lin.perm), torch.arange(C)] = 1
            s = torch.as_tensor(layer.lin.sign_host, dtype=x.dtype) * torch.exp(log_s)
            Wm = perm @ (torch.tril(L, -1) + torch.eye(C, dtype=x.dtype)) @ (torch.triu(U, 1) + torch.diag(s))
            img = F.conv2d(img, Wm.T[:, :, None, None])
            logdet = logdet + H * W * log_s.sum()
        else:
            ca = C // 2
            xa, xb = img[:, :ca], img[:, ca:]
            a = F.relu(F.conv2d(xa, P[f"{i}.net.0.W"], P[f"{i}.net.0.b"], padding=1))
            a = F.relu(F.conv2d(a, P[f"{i}.net.2.W"], P[f"{i}.net.2.b"]))
            o = F.conv2d(a, P[f"{i}.net.4.W"], P[f"{i}.net.4.b"], padding=1)
            t, r = o[:, 0::2], o[:, 1::2] + 2
            img = torch.cat([xa, (xb + t) * torch.sigmoid(r)], 1)
            logdet = logdet + F.logsigmoid(r).sum((1, 2, 3))
        h = torch.cat([img.reshape(x.shape[0], -1), rest], 1)
    return (-0.5 * h ** 2 - 0.5 * math.log(2 * math.pi)).sum(1) + logdet


CASES = [((1, 8, 8), 2, 2, 6), ((3, 4, 4), 1, 2, 5), ((2, 4, 4), 2, 1, 4)]


@pytest.mark.parametrize("shape,levels,depth,hidden", CASES)
def test_glow_loss_and_every_gradient_match_pytorch(f64, rng, shape, levels, depth, hidden):
    fl = NF.glow(shape, levels=levels, depth=depth, hidden=hidden, seed=3)
    d = int(np.prod(shape))
    fl.forward(rng.uniform(0, 1, (16, d)))   # the ActNorm init
    fl.flat_params[...] += 0.1 * rng.standard_normal(fl.flat_params.shape)
    x = rng.uniform(0, 1, (7, d))
    loss = float(fl.loss_and_grad(x))
    P = {n: torch.tensor(np.array(p), requires_grad=True) for n, p in fl.params.items()}
    tloss = -_torch_glow_logprob(fl, P, torch.tensor(x)).mean()
    tloss.backward()
    assert abs(loss - tloss.item()) <= 1e-10 * max(1.0, abs(loss))
    for n, g in fl.grads.items():
        tg = P[n].grad.numpy()
        err = np.max(np.abs(g - tg)) / max(1e-12, np.max(np.abs(tg)))
        assert err < 1e-8, (n, err)
    assert any(np.abs(g).max() > 1e-3 for n, g in fl.grads.items() if n.endswith("net.0.W"))
