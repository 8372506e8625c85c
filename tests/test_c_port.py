"""The plain-C port (port/c/, issue 27 part 3) against the committed reference vectors.

The C compiler builds ``port/c/*.c`` once per session; every case the port implements then gets the stored
``input/*`` tensors of its ``tests/reference`` .npz in the port's binary format (port/c/README.md) and must
give every stored ``output/*`` and ``grad/*`` within the manifest's tolerance, by check-reference's error
formula. Skipped without a C compiler, or where port/c is absent (a trimmed source tree)."""
import json
import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from npdgm.reference import KERNEL_CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = os.path.join(ROOT, "port", "c")
REFERENCE = os.path.join(ROOT, "tests", "reference")
SETS = {"kernels-f64": KERNEL_CASES, "models-f64": ["vae_bernoulli"]}  # what the C driver may cover
CC = shutil.which("cc")

pytestmark = [pytest.mark.skipif(CC is None, reason="no C compiler (cc) on PATH"),
              pytest.mark.skipif(not os.path.isdir(PORT), reason="port/c is not in this source tree")]


# -- the binary format: int64 count; per tensor int64 name length, name, int64 ndim, int64 dims, float64 data --
def encode(tensors):
    """{name: array} -> bytes of the port's format (little-endian; every array sent as float64)."""
    parts = [struct.pack("<q", len(tensors))]
    for name, a in tensors.items():
        a = np.asarray(a, dtype="<f8")
        raw = name.encode()
        parts += [struct.pack("<q", len(raw)), raw, struct.pack(f"<q{a.ndim}q", a.ndim, *a.shape), a.tobytes()]
    return b"".join(parts)


def decode(data):
    """bytes of the port's format -> {name: float64 array}; ValueError when it is not well formed."""
    def take(n):
        nonlocal pos
        if pos + n > len(data):
            raise ValueError(f"the C port's output ends at byte {len(data)}, wanted {pos + n}")
        pos += n
        return data[pos - n:pos]

    pos, out = 0, {}
    (count,) = struct.unpack("<q", take(8))
    for _ in range(count):
        (n,) = struct.unpack("<q", take(8))
        name = take(n).decode()
        (ndim,) = struct.unpack("<q", take(8))
        shape = struct.unpack(f"<{ndim}q", take(8 * ndim))
        out[name] = np.frombuffer(take(8 * int(np.prod(shape))), dtype="<f8").reshape(shape)
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the last tensor")
    return out


def port_inputs(stored):
    """The .npz's input/* tensors as the driver reads them: names without the prefix; a model case's
    ``input/model`` (JSON bytes) as its config tensors (hidden sizes, beta, strings as byte values)."""
    inputs = {k[len("input/"):]: v for k, v in stored.items() if k.startswith("input/")}
    if "model" in inputs:
        desc = json.loads(inputs.pop("model").tobytes().decode())
        cfg = desc["config"]
        inputs.update(hidden=np.asarray(cfg["hidden"], float), beta=np.asarray(cfg["beta"], float),
                      activation=np.frombuffer(cfg["activation"].encode(), np.uint8),
                      likelihood=np.frombuffer(cfg["likelihood"].encode(), np.uint8))
    return inputs


def errors(got, stored):
    """{key: max|port - reference| / max(1, max|reference|)} over the stored output/ and grad/ tensors
    (inf where the port gave none or a wrong shape): npdgm.reference.check_reference's formula."""
    rows = {}
    for key in sorted(k for k in stored if not k.startswith("input/")):
        ref = stored[key].astype(np.float64)
        if key not in got or got[key].shape != ref.shape:
            rows[key] = float("inf")
            continue
        scale = max(1.0, float(np.max(np.abs(ref), initial=0.0)))
        rows[key] = float(np.max(np.abs(got[key] - ref), initial=0.0)) / scale
    return rows


def load_case(refset, name):
    with open(os.path.join(REFERENCE, refset, "manifest.json")) as f:
        manifest = json.load(f)
    with np.load(os.path.join(REFERENCE, refset, manifest["cases"][name]["file"])) as z:
        return {k: z[k] for k in z.files}, manifest["tolerance"]


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    """The compiled driver (cc -O2 -std=c99 -Wall -Werror port/c/*.c -lm)."""
    exe = str(tmp_path_factory.mktemp("cport") / "npdgm-c")
    sources = sorted(os.path.join(PORT, f) for f in os.listdir(PORT) if f.endswith(".c"))
    r = subprocess.run([CC, "-O2", "-std=c99", "-Wall", "-Werror", *sources, "-lm", "-o", exe],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def run_port(exe, case, tensors):
    r = subprocess.run([exe, case], input=encode(tensors), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    return decode(r.stdout)


def supported(exe):
    return subprocess.run([exe, "--list"], capture_output=True, text=True, check=True).stdout.split()


def readme_lists():
    """(ported, not ported, extra) case names from port/c/README.md's lines ``ported: ...``, ``not ported: ...``
    (reference cases) and ``extra: ...`` (driver cases that are not reference cases)."""
    text = open(os.path.join(PORT, "README.md")).read()
    found = {}
    for label in ("ported", "not ported", "extra"):
        m = re.search(rf"^{label}: (.+)$", text, re.M)
        assert m, f"port/c/README.md has no line '{label}: ...'"
        found[label] = [n.strip() for n in m.group(1).split(",")]
    return found["ported"], found["not ported"], found["extra"]


PORTED, NOT_PORTED, EXTRA = readme_lists() if os.path.isdir(PORT) else ([], [], [])
CASES = [(s, n) for s, names in SETS.items() for n in names if n in PORTED]


@pytest.mark.parametrize("refset, name", CASES, ids=[n for _, n in CASES])
def test_port_matches_the_reference_vectors(port, refset, name):
    stored, tol = load_case(refset, name)
    errs = errors(run_port(port, name, port_inputs(stored)), stored)
    assert errs and all(e <= tol for e in errs.values()), {k: e for k, e in errs.items() if e > tol}


def test_readme_states_what_is_ported_and_the_driver_agrees(port):
    every = [n for names in SETS.values() for n in names]
    assert sorted(PORTED + EXTRA) == sorted(supported(port))
    assert sorted(PORTED + NOT_PORTED) == sorted(every), "port/c/README.md must list every reference case once"
    assert {"linear", "bernoulli_nll", "reparameterize", "kl_std_normal", "affine_coupling_half", "adam_step",
            "vae_bernoulli"} <= set(PORTED)


def test_vae_training_steps_match_npdgm(port):
    """The C training step (gradient, then Adam) three times on the vae_bernoulli batch and noise gives npdgm's
    losses and parameters (VAE.loss_and_grad + optim.Adam, lr 1e-2), by the same error rule."""
    from npdgm import backend
    from npdgm.models.registry import MODELS
    from npdgm.optim import Adam

    stored, tol = load_case("models-f64", "vae_bernoulli")
    config = json.loads(stored["input/model"].tobytes().decode())["config"]
    with backend.use("numpy", "float64"):
        model = MODELS["vae"].from_config(config)
        model.flat_params[...] = stored["input/params"]
        opt, losses = Adam(model, lr=1e-2), []
        for _ in range(3):
            losses.append(float(model.loss_and_grad(stored["input/x"], stored["input/eps"])[0]))
            opt.step()
    want = {"output/loss": np.array(losses), "output/params": model.flat_params.copy()}
    got = run_port(port, "vae_bernoulli_train", {**port_inputs(stored), "steps": 3.0, "lr": 1e-2})
    errs = errors(got, want)
    assert all(e <= tol for e in errs.values()), errs
    assert losses[2] < losses[0] and np.abs(want["output/params"] - stored["input/params"]).max() > 1e-3


def test_the_comparison_catches_a_wrong_kernel(port):
    """The check can fail: a wrong kernel (here: the reference outputs nudged, and the port fed other inputs)
    exceeds the tolerance."""
    stored, tol = load_case("kernels-f64", "tanh")
    got = run_port(port, "tanh", port_inputs(stored))
    assert max(errors(got, stored).values()) <= tol
    nudged = {**got, "grad/x": got["grad/x"] + 1e-8}
    assert errors(nudged, stored)["grad/x"] > tol
    assert errors({k: v for k, v in got.items() if k != "output/y"}, stored)["output/y"] == float("inf")
    wrong = run_port(port, "sigmoid", port_inputs(stored))      # another activation on the same inputs
    assert errors(wrong, stored)["output/y"] > tol
    stored, tol = load_case("models-f64", "vae_bernoulli")
    inputs = port_inputs(stored)
    inputs["eps"] = -inputs["eps"]                 # other noise: every term but the KL and every gradient moves
    errs = errors(run_port(port, "vae_bernoulli", inputs), stored)
    assert errs.pop("output/kl") <= tol and min(errs.values()) > tol, errs


def test_bad_input_is_one_clear_error(port):
    stored, _ = load_case("kernels-f64", "linear")
    inputs = port_inputs(stored)
    for tensors, msg in [({k: v for k, v in inputs.items() if k != "b"}, "case linear needs the tensor b"),
                         ({**inputs, "b": np.zeros(4)}, "tensor b has shape (4,), expected (3,)")]:
        r = subprocess.run([port, "linear"], input=encode(tensors), capture_output=True)
        err = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and err[0].startswith("npdgm-c: error: ") and msg in err[0], err
    r = subprocess.run([port, "linear"], input=encode(inputs)[:-5], capture_output=True)
    assert r.returncode == 2 and "truncated" in r.stderr.decode()
    r = subprocess.run([port, "no_such_case"], input=b"", capture_output=True)
    assert r.returncode == 2 and "unknown case no_such_case" in r.stderr.decode()


def test_sdist_carries_the_port():
    text = open(os.path.join(ROOT, "MANIFEST.in")).read()
    assert re.search(r"^graft port$", text, re.M)
