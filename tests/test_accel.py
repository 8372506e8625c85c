"""The fast wing (npdgm/accel/) against the reference: every twin beside its reference kernel on every
input maker of the kernel table (the formulas' NumPy evaluation, numexpr and numba on the CPU), the
generated CUDA source compiled and run as C++ on the CPU, and (``pytest -m gpu``) the generated CuPy
kernels on a GPU. The reference never imports the wing (tests/test_imports.py)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from npdgm import accel, backend
from npdgm import kernels as K
from npdgm.accel import cuda, engines, twins
from npdgm.accel import formulas as F
from npdgm.kernels import dispatch, table

HAVE_NUMEXPR = engines.engine_available("numexpr")
HAVE_NUMBA = engines.engine_available("numba")
ENGINES = ["numpy", pytest.param("numexpr", marks=pytest.mark.skipif(not HAVE_NUMEXPR, reason="numexpr absent"))]
NUMBA_ENTRIES = ("relu", "bernoulli_nll", "reparameterize_samples")  # ~0.5 s of compiling per formula


@pytest.fixture
def cpu_fused():
    """accel.enable(...) for the test, switched off (the reference) after it."""
    yield accel.enable
    accel.disable()


def _arrays(out_grads):
    outputs, grads = out_grads
    return {**{f"out.{k}": np.asarray(v) for k, v in outputs.items()},
            **{f"grad.{k}": np.asarray(v) for k, v in grads.items()}}


def _plain_and_fused(entry, dtype, engine):
    inputs = entry.make(np.random.default_rng(11), dtype)
    plain = _arrays(entry.run(inputs))
    accel.enable(engine, min_size=0)
    try:
        fast = _arrays(entry.run(inputs))
    finally:
        accel.disable()
    return plain, fast


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_twins_match_reference_kernels_on_every_table_entry(dtype, engine, monkeypatch):
    """Every twin (a formula evaluated by NumPy) is its reference kernel to the last bit (same operation
    order); numexpr and numba (their own exp/log1p, whose last bit depends on the CPU and the library's SIMD
    path) are within 16 ulps of the values' scale, and so are the convolution twins (the same products summed
    in another order; tests/test_accel_conv.py). Every formula but Adam's (tests/test_optim.py) is reached
    by some entry."""
    called = set()
    run = twins.run
    monkeypatch.setattr(twins, "run", lambda name, *a, **k: called.add(name) or run(name, *a, **k))
    eps = np.finfo(dtype).eps
    for entry in table.TABLE:
        plain, fast = _plain_and_fused(entry, dtype, engine)
        assert plain.keys() == fast.keys()
        for k, a in plain.items():
            b = fast[k]
            assert b.dtype == a.dtype and b.shape == a.shape, (entry.name, k)
            if engine == "numpy" and entry.group != "conv":
                np.testing.assert_array_equal(b, a, err_msg=f"{entry.name} {k}")
            else:
                _close(b, a, eps, f"{entry.name} {k}")
    assert called == set(F.FORMULAS) - {"adam"}


def _close(b, a, eps, what, ulps=16):
    """|b - a| <= ulps * eps * (|a| + max |a|): a few ulps of the values' own scale."""
    scale = np.abs(a) + np.abs(a).max()
    assert np.all(np.abs(b - a) <= ulps * eps * scale), (what, np.abs(b - a).max())


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba absent")
@pytest.mark.parametrize("name", NUMBA_ENTRIES)
def test_numba_loops_match_plain_kernels(name):
    """The generated numba loop (flat, rows x columns with a broadcast column, and the NumPy fallback of a
    (K, B, Z) broadcast) against the plain kernel, float32."""
    entry = table.KERNELS[name]
    plain, fast = _plain_and_fused(entry, np.float32, "numba")
    for k, a in plain.items():
        assert fast[k].dtype == a.dtype
        _close(fast[k], a, np.finfo(np.float32).eps, f"{name} {k}")


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba absent")
def test_numba_vector_exp_and_log1p_against_float64():
    """The float32 loops' exp and log1p (vectorizable polynomials, F.numba_vector_math): within 1 and 2.5
    ulps of the float64 value over their whole range, and NumPy's answer on inf, -inf, NaN, 0, -0, -1,
    below -1, the overflow edge and the denormal range."""
    import numba

    vm = F.numba_vector_math()
    exp32, log1p32 = vm["_exp32"], vm["_log1p32"]

    @numba.njit(error_model="numpy")
    def both(x, e, l):
        for i in range(x.size):
            e[i] = exp32(x[i])
            l[i] = log1p32(x[i])

    r = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-110, 95, 400_001), r.standard_normal(50_000) * 4,
                        np.geomspace(1e-30, 1e30, 100_001), -np.geomspace(1e-30, 1 - 6e-8, 100_001),
                        [0.0, -0.0, -1.0, -2.0, np.inf, -np.inf, np.nan, 88.7, 88.73, -87.5, -103.5, -104.0]]
                       ).astype(np.float32)
    e, l = np.empty_like(x), np.empty_like(x)
    both(x, e, l)
    with np.errstate(all="ignore"):
        for got, ref, want, ulps in ((e, np.exp(x.astype(np.float64)), np.exp(x), 1.0),
                                     (l, np.log1p(x.astype(np.float64)), np.log1p(x), 2.5)):
            fin = np.isfinite(ref) & (np.abs(ref) >= np.finfo(np.float32).tiny) & (np.abs(ref) < 3.4e38)
            err = np.abs(got[fin] - ref[fin]) / np.spacing(np.abs(ref[fin]).astype(np.float32))
            assert err.max() <= ulps, (x[fin][np.argmax(err)], err.max())
            odd = ~fin
            assert np.allclose(got[odd], want[odd], rtol=0.05, atol=1e-44, equal_nan=True), (x[odd], got[odd], want[odd])
            assert (np.signbit(got[odd]) == np.signbit(want[odd]))[~np.isnan(want[odd])].all()


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba absent")
def test_numba_rows_x_columns_loop_takes_strided_views_columns_and_rows():
    """The VAE's mu / logvar are column slices of the encoder output (row stride 2 Z, not C-contiguous) and
    dL/dkl enters as a (B, 1) column: the rows x columns loop reads them in place, with the same bits as
    contiguous copies, and a (D,) row broadcasts like NumPy's."""
    r = np.random.default_rng(7)
    h = r.standard_normal((300, 40)).astype(np.float32)
    mu, lv = h[:, :20], h[:, 20:]
    dkl = r.random(300).astype(np.float32)[:, None]
    f = F.FORMULAS["kl_std_normal_backward"]
    got = f.numba(dkl=dkl, mu=mu, logvar=lv)
    want = f.numba(dkl=np.ascontiguousarray(np.broadcast_to(dkl, mu.shape)), mu=np.ascontiguousarray(mu),
                   logvar=np.ascontiguousarray(lv))
    for k in ("dmu", "dlogvar"):
        np.testing.assert_array_equal(got[k], want[k])
    kl = F.FORMULAS["kl_std_normal_forward"].numba(mu=mu, logvar=lv)["kl"]
    _close(kl, 0.5 * (mu * mu + np.exp(lv) - 1 - lv).sum(axis=1), np.finfo(np.float32).eps, "kl rows")
    row = r.standard_normal(20).astype(np.float32)
    dx = F.FORMULAS["tanh_backward"].numba(dy=mu, y=row)["dx"]
    np.testing.assert_array_equal(dx, F.FORMULAS["tanh_backward"].numpy(dy=mu, y=row)["dx"])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NUMBA, reason="numba absent")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_loops_on_every_table_entry(dtype):
    """Every kernel-table entry through the numba loops (~40 s of compiling): within 1 ulp of the values'
    scale of the plain kernels here (16 allowed), float64 included (the row sums' order differs)."""
    for entry in table.TABLE:
        plain, fast = _plain_and_fused(entry, dtype, "numba")
        for k, a in plain.items():
            assert fast[k].dtype == a.dtype and fast[k].shape == a.shape
            _close(fast[k], a, np.finfo(dtype).eps, f"{entry.name} {k}")


def test_fused_cpu_path_is_off_by_default_and_small_arrays_stay_plain(cpu_fused):
    x = np.ones((4, 3), np.float32)
    assert accel.engine() == "off" and engines.cpu_engine() is None and not engines.on_cpu(x, x)
    assert not dispatch.twins()
    assert cpu_fused("numpy", min_size=13) == "numpy" == accel.engine()
    assert not engines.on_cpu(x, x) and engines.on_cpu(np.ones((13,), np.float32))
    assert not engines.on_cpu(x, x.astype(np.float64)) and not engines.on_cpu(np.ones(20, np.int64))
    with pytest.raises(ValueError, match="unknown accel engine 'jax'"):
        cpu_fused("jax")


def test_auto_without_numba_and_numexpr_runs_the_threaded_optimizer_only(cpu_fused, monkeypatch):
    """auto takes the first installed of numba, numexpr; without either the wing stays on with no CPU
    engine ("threads": reference kernels, the chunked threaded Adam); naming a missing engine is an error."""
    if HAVE_NUMEXPR:                         # auto skips a missing numba for an installed numexpr
        monkeypatch.setattr(accel, "engine_available", lambda e: e == "numexpr")
        assert cpu_fused("auto") == "numexpr"
    monkeypatch.setattr(accel, "engine_available", lambda e: e == "numpy")
    monkeypatch.setattr(engines, "engine_available", lambda e: e == "numpy")
    assert cpu_fused("auto") == "threads" == accel.engine()
    assert engines.cpu_engine() is None and dispatch.twins()
    with pytest.raises(ImportError, match="fused CPU engine 'numexpr' is not installed"):
        cpu_fused("numexpr")


@pytest.mark.skipif(not HAVE_NUMEXPR, reason="numexpr absent")
def test_numexpr_keeps_float32_and_writes_in_place():
    """Numbers enter numexpr as the arrays' dtype (else float32 * 0.5 is computed in float64)."""
    r = np.random.default_rng(0)
    mu, lv, eps = (r.standard_normal((6, 5)).astype(np.float32) for _ in range(3))
    z = F.FORMULAS["reparameterize_forward"].numexpr(mu=mu, logvar=lv, eps=eps)["z"]
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, mu + np.exp(0.5 * lv) * eps, rtol=1e-6, atol=1e-6)
    out = np.empty_like(mu)
    res = F.FORMULAS["tanh_backward"].numexpr(out={"dx": out}, dy=mu, y=lv)
    assert res["dx"] is out
    np.testing.assert_allclose(out, mu * (1 - lv * lv), rtol=1e-6, atol=1e-6)


# -- the formula language -------------------------------------------------------------------------
@pytest.mark.parametrize("text, arrays, message", [
    ("dx = where(y > 0, dy)", "dy y", "where takes 3 arguments"),
    ("dx = sin(y)", "y", "functions are"),
    ("dx = dy * w", "dy", r"unknown name\(s\) \['w'\]"),
    ("dy = dy * 2", "dy", "'dy' is an input"),
    ("dx = dy[0]", "dy", "Subscript is not in the formula language"),
    ("dx = 0 < dy < 1", "dy", "Compare is not in the formula language"),
    ("dx dy", "dy", "expected 'name = expression'"),
    ("dx = (dy", "dy", "line 1"),
    ("i = dy", "dy", "reserved in CUDA"),
])
def test_formula_language_errors_name_the_line(text, arrays, message):
    with pytest.raises(F.FormulaError, match=message):
        F.Formula("bad", text, arrays)


def test_temporaries_are_inlined_and_a_stale_read_is_refused():
    f = F.FORMULAS["softplus_backward"]
    assert f.expressions() == [("dx", "dy * (where(x >= 0, 1, exp(-abs(x))) / (1 + exp(-abs(x))))", False)]
    with pytest.raises(F.FormulaError, match="updated in place"):
        F.Formula("stale", "a = 2 * m\nm = m + 1\nx = a + m", "m", inplace="m", outputs="m x").expressions()


def test_every_twinnable_reference_has_a_twin_of_its_name_and_the_docstring_tells_the_choice():
    """Every ``@twinnable`` kernel gets a twin of the same name at switch-on (and Sequential.forward,
    Module.zero_grad, Linear.backward, Adam.step, the MAF solve theirs); switching off removes them all."""
    import inspect

    from npdgm.accel import conv as conv_twins
    from npdgm.kernels import activations, conv, coupling, gaussian, linear, losses

    refs = {f.twin_name for m in (activations, conv, coupling, gaussian, linear, losses)
            for _, f in inspect.getmembers(m) if hasattr(f, "twin_name")}
    assert all(ref.__name__ == twin.__name__ for ref, twin in twins.TWINS + conv_twins.TWINS)
    assert len(refs) == 25
    try:
        accel.enable("numpy")
        assert set(dispatch.twins()) == refs | {"npdgm.nn.layers.Sequential.forward", "npdgm.optim.Adam.step",
                                                "npdgm.nn.module.Module.zero_grad", "npdgm.nn.layers.Linear.backward",
                                                "npdgm.models.autoregressive._Autoregressive._solve"}
    finally:
        accel.disable()
    assert dispatch.twins() == {}
    assert "numba" in F.__doc__ and "numexpr" in F.__doc__


# -- the generated CUDA source ------------------------------------------------------------------------
def _cuda_values(f, rng):
    vals = {a: float(rng.uniform(-2.5, 2.5)) for a in f.arrays}
    if "v" in vals:
        vals["v"] = abs(vals["v"])
    vals.update(t=3.0, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, l2=0.01, decay=1.0, slope=0.01, alpha=1.0)
    return vals


def _cpp_program(cases):
    """A C++ file running every generated kernel body (T = float and double) on the given values."""
    src = ["#include <cmath>", "#include <cstdio>", "using namespace std;", "#define __device__",
           "#define __forceinline__ inline", F.CUDA_PREAMBLE]
    main = []
    for name, f, vals in cases:
        spec = f.cuda()
        ins = [p.replace("float64 ", "double ") for p in spec["in_params"].split(", ")]
        if f.rows:
            src.append(f"template <typename T> T k_{name}({', '.join(ins)}) {{ return {spec['map_expr']}; }}")
            outs = [f.rows]
        else:
            outs = [o.split()[1] for o in spec["out_params"].split(", ")]
            src.append(f"template <typename T> void k_{name}({', '.join(ins + [f'T& {o}' for o in outs])}) "
                       f"{{\n{spec['operation']}\n}}")
        for T in ("double", "float"):
            args = [f"({T}){vals[p.split()[1]]!r}" if p.startswith("T ") else repr(vals[p.split()[1]]) for p in ins]
            decl = " ".join(f"{T} {o} = ({T}){vals.get(o, 0.0)!r};" for o in outs)
            call = (f"{f.rows} = k_{name}<{T}>({', '.join(args)});" if f.rows
                    else f"k_{name}<{T}>({', '.join(args + outs)});")
            prints = " ".join(f'printf("{name} {T} {o} %.17g\\n", (double){o});' for o in outs)
            main.append(f"{{ {decl} {call} {prints} }}")
    src.append("int main() {\n" + "\n".join(main) + "\nreturn 0; }")
    return "\n".join(src)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to compile the generated CUDA source as C++")
def test_generated_cuda_source_compiles_and_computes_the_formula(tmp_path):
    """Every generated ElementwiseKernel body / ReductionKernel map expression, compiled as C++ with the
    preamble (T = double and float), gives the NumPy reference's numbers on a few points."""
    rng = np.random.default_rng(5)
    cases = [(f"{name}_{j}", f, _cuda_values(f, rng)) for name, f in F.FORMULAS.items() for j in range(3)]
    (tmp_path / "k.cpp").write_text(_cpp_program(cases))
    r = subprocess.run(["g++", "-O0", "-Wall", "-Werror", "-o", str(tmp_path / "k"), str(tmp_path / "k.cpp")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {}
    for line in subprocess.run([str(tmp_path / "k")], capture_output=True, text=True, check=True).stdout.split("\n"):
        if line:
            name, T, out, value = line.split()
            got[(name, T, out)] = float(value)
    for name, f, vals in cases:
        arrays = {a: np.array([[vals[a]]]) for a in f.arrays}
        ref = f.numpy(**arrays, **{s: vals[s] for s in f.scalars})
        for o in f.outputs:
            want = float(np.asarray(ref[o]).ravel()[0])
            assert got[(name, "double", o)] == pytest.approx(want, rel=1e-12, abs=1e-12), (name, o)
            assert got[(name, "float", o)] == pytest.approx(want, rel=1e-5, abs=1e-5), (name, o)


def test_cuda_source_is_generated_from_the_text():
    relu = F.FORMULAS["relu_backward"].cuda()
    assert relu["operation"] == "dx = where((y > ((T)0.0)), dy, ((T)0.0));"
    assert (relu["in_params"], relu["out_params"]) == ("T dy, T y", "T dx")
    adam = F.FORMULAS["adam"].cuda()
    assert adam["out_params"] == "T p, T m, T v" and adam["in_params"].startswith("T g, float64 t, float64 lr")
    assert "const double step = ((lr * sqrt((1.0 - pow(b2, t)))) / (1.0 - pow(b1, t)));" in adam["operation"]
    kl = F.FORMULAS["kl_std_normal_forward"].cuda()
    assert kl["map_expr"] == "(((T)0.5) * ((((mu * mu) + exp(logvar)) - ((T)1.0)) - logvar))"
    assert "where" in F.CUDA_PREAMBLE


# -- GPU: the generated CuPy kernels against the plain array code (skipped without CuPy) ------------
@pytest.mark.gpu
@pytest.mark.parametrize("entry", table.TABLE, ids=lambda e: e.name)
def test_cupy_fused_kernels_match_plain_cupy_and_numpy(cupy, entry):
    inputs = entry.make(np.random.default_rng(1), np.float32)
    host = _arrays(entry.run(inputs))
    dev = {k: cupy.asarray(v) for k, v in inputs.items()}
    try:
        accel.disable()
        plain = {k: cupy.asnumpy(v) for k, v in _dev_arrays(entry.run(dev)).items()}
        accel.enable()
        fast = {k: cupy.asnumpy(v) for k, v in _dev_arrays(entry.run(dev)).items()}
    finally:
        accel.disable()
    for k, h in host.items():
        scale = np.abs(h) + np.abs(h).max()
        for other in (plain[k], fast[k]):
            assert np.all(np.abs(other - h) <= 32 * np.finfo(np.float32).eps * scale + 1e-30), (entry.name, k)


def _dev_arrays(out_grads):
    outputs, grads = out_grads
    return {**{f"out.{k}": v for k, v in outputs.items()}, **{f"grad.{k}": v for k, v in grads.items()}}


@pytest.mark.gpu
@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_cupy_fused_adam_matches_plain_update(cupy, wd, decoupled):
    from npdgm import optim
    from npdgm.accel.optim import CHUNK
    from npdgm.nn import Parameter

    r = np.random.default_rng(2)
    p0 = r.standard_normal(3 * CHUNK + 7).astype(np.float32)
    grads = [r.standard_normal(p0.size).astype(np.float32) for _ in range(4)]
    out = {}
    for mode in ("numpy", "plain", "fused"):
        accel.enable() if mode == "fused" else accel.disable()
        try:
            p = Parameter(p0.copy() if mode == "numpy" else cupy.asarray(p0))
            opt = optim.Adam([p], lr=1e-2, weight_decay=wd, decoupled=decoupled)
            for g in grads:
                p.grad[...] = g if mode == "numpy" else cupy.asarray(g)
                opt.step()
            out[mode] = backend.to_host(p.data)
        finally:
            accel.disable()
    np.testing.assert_allclose(out["fused"], out["plain"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["fused"], out["numpy"], rtol=1e-5, atol=1e-6)


def test_gpu_only_paths_are_inert_without_cupy():
    """The wing never runs CuPy code for NumPy arrays; without CuPy its switches are no-ops and nothing
    imports cupy."""
    from npdgm.bench import workloads

    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    assert not engines.on_gpu(x)
    np.testing.assert_array_equal(K.relu_backward(x, np.maximum(x, 0)), x * (x > 0))
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert cuda.set_tf32(True) is False
        assert "cupy" not in sys.modules
        w = type(workloads.get_workload("vae"))()
        w.x_dim, w.hidden, w.z_dim = 784, 32, 4
        with pytest.raises(backend.BackendError, match="CuPy"):
            workloads.NpdgmRunner(w, batch=4, backend="cupy")
    finally:
        backend.set_backend("numpy")
        accel.disable()


def test_gpu_check_script_is_valid_bash_and_says_no_gpu(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if backend.cupy_available():
        pytest.skip("a GPU is visible: the script would run the check")
    env = {**os.environ, "OUT": str(tmp_path)}
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "gpu_check: no GPU" in r.stderr


def test_bench_has_a_fused_cpu_row(monkeypatch):
    """``npdgm bench --backends numpy,numpy-fused`` plans an npdgm-numpy-fused row beside npdgm-numpy, or
    skips it with a note when neither numba nor numexpr is installed."""
    from npdgm.bench import run

    args = run.parse_args(["--backends", "numpy,numpy-fused", "--workloads", "vae", "--no-floor"])
    monkeypatch.setattr(accel, "engine_available", lambda e: e == "numexpr")
    points, _, notes = run.plan(args)
    assert [p["backend"] for p in points] == ["npdgm-numpy", "npdgm-numpy-fused"]
    monkeypatch.setattr(accel, "engine_available", lambda e: e == "numpy")
    points, _, notes = run.plan(args)
    assert [p["backend"] for p in points] == ["npdgm-numpy"]
    assert any("numpy-fused: neither numba nor numexpr" in n for n in notes)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba absent")
def test_numba_parallel_loop_is_bitwise_the_serial_one(cpu_fused):
    """threads > 1 splits the same per-element loop over numba's threads: the same bits as one thread."""
    r = np.random.default_rng(4)
    dy, y = (r.standard_normal((300, 40)).astype(np.float32) for _ in range(2))
    outs = []
    for threads in (1, 2):
        assert cpu_fused("numba", min_size=0, threads=threads) == "numba"
        assert engines._state["threads"] == threads
        outs.append(K.tanh_backward(dy, y))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], dy * (1 - y * y))


def test_sequential_twin_fuses_linear_relu_pairs_with_the_reference_bits(cpu_fused):
    """The wing's Sequential.forward runs each Linear + ReLU pair through the bias-add + ReLU formula: the
    forward, the caches the backward reads, and so the gradients are the reference's bits."""
    from npdgm.nn import MLP

    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal((64, 30)).astype(np.float32), rng.standard_normal((64, 5)).astype(np.float32)
    out = []
    for wing in ("off", "numpy"):
        cpu_fused(wing, min_size=0)
        m = MLP(30, [40, 20], 5, rng=0).flatten()
        y = m.forward(x)
        m.backward(dy)
        out.append((y, m.flat_grads.copy()))
    np.testing.assert_array_equal(out[1][0], out[0][0])
    np.testing.assert_array_equal(out[1][1], out[0][1])


def test_accel_off_after_on_reproduces_the_reference_bits_of_a_vae_step(cpu_fused):
    """A VAE step (loss, gradients, Adam) with the wing switched on and off again is the reference's
    step bit for bit: switching off leaves nothing behind."""
    from npdgm import VAE
    from npdgm.optim import Adam

    rng = np.random.default_rng(7)
    x = (rng.random((32, 20)) > 0.5).astype(np.float32)
    eps = rng.standard_normal((32, 3)).astype(np.float32)

    def step():
        m = VAE(x_dim=20, hidden=(16,), z_dim=3, seed=0)
        opt = Adam(m, lr=1e-2)
        loss, _ = m.loss_and_grad(x, eps)
        opt.step()
        return float(loss), m.flat_params.copy()

    ref = step()
    cpu_fused("auto", min_size=0)
    fast = step()
    accel.disable()
    again = step()
    assert again[0] == ref[0] and np.array_equal(again[1], ref[1])
    np.testing.assert_allclose(fast[1], ref[1], rtol=1e-5, atol=1e-6)


def test_train_accel_option_is_recorded_and_off_gives_the_reference_bits(tmp_path):
    """``npdgm train vae --accel off`` runs the reference whatever the wing's state before (its checkpoint is
    the bits of a reference run) and records "off"; the default (auto) records the engine it ran; the
    command leaves the wing as it found it."""
    from npdgm.cli import main
    from npdgm.io import load_arrays

    common = ["train", "vae", "--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--no-plots",
              "--no-progress", "--overwrite"]
    runs = {}
    for name, wing_before, opt in (("ref", "off", ["--accel", "off"]), ("off", "numpy", ["--accel", "off"]),
                                   ("auto", "off", [])):
        accel.enable(wing_before)
        try:
            assert main([*common, "--out", str(tmp_path / name), *opt]) == 0
            assert accel.engine() == ("off" if wing_before == "off" else "numpy")      # restored
        finally:
            accel.disable()
        runs[name] = load_arrays(str(tmp_path / name))
    assert runs["ref"][1]["run"]["accel"] == runs["off"][1]["run"]["accel"] == "off"
    assert runs["auto"][1]["run"]["accel"] == accel.enable("auto")
    accel.disable()
    for k, a in runs["ref"][0].items():
        if k.startswith("param"):
            np.testing.assert_array_equal(runs["off"][0][k], a, err_msg=k)


# -- zero_grad + Linear.backward: gradients written straight into zeroed buffers ----------------------------
def _grad_twins_only():
    """Only the wing's zero_grad and Linear.backward twins (every other function the reference): what
    they compute must then equal the reference's gradients exactly."""
    from npdgm.accel import layers as wing_layers
    from npdgm.nn.layers import Linear
    from npdgm.nn.module import Module

    dispatch.set_twins({Module.zero_grad.twin_name: wing_layers.zero_grad,
                        Linear.backward.twin_name: wing_layers.linear_backward})


def _model_grads(build, run, wing):
    """Flat gradients after ``run(model)`` (twice: a second step reuses the record) with the grad twins on
    (``wing``) or the reference."""
    old = backend.get_dtype()
    backend.set_dtype("float32")
    try:
        model = build()
        if wing:
            _grad_twins_only()
        out = []
        for _ in range(2):
            run(model)
            out.append(model.flat_grads.copy())
        return out
    finally:
        dispatch.set_twins({})
        backend.set_dtype(old)


def _same_grads(build, run):
    ref, fast = _model_grads(build, run, False), _model_grads(build, run, True)
    for r, f in zip(ref, fast):
        assert np.any(r != 0)
        np.testing.assert_array_equal(f, r)     # equal values (a -0.0 may read +0.0 in the reference)


def test_linear_backward_twin_writes_zeroed_gradients_and_adds_otherwise():
    """Right after zero_grad the twin writes dW, db into the gradients (the reference's values); a second
    backward of the same layer without zero_grad adds, as the reference does; switched off, nothing stays."""
    from npdgm.nn import Linear

    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((16, 6)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)

    def run(lin):
        lin.zero_grad()
        lin.forward(x)
        dx = lin.backward(dy)
        lin.backward(dy, need_dx=False)         # no zero_grad in between: accumulates
        return dx

    def build():
        return Linear(6, 4, rng=0, dtype=np.float32).flatten()

    _same_grads(build, run)
    lin = build()
    _grad_twins_only()
    try:
        lin.zero_grad()
        lin.forward(x)
        dx_fast = lin.backward(dy)
        assert np.array_equal(lin.W.grad, x.T @ dy) and np.array_equal(lin.b.grad, dy.sum(axis=0))
    finally:
        dispatch.set_twins({})
    np.testing.assert_array_equal(dx_fast, dy @ lin.W.data.T)


def test_grad_twins_give_the_reference_gradients_of_the_benchmark_models():
    """vae, nice (small), realnvp2d: the whole-model gradients with the grad twins on equal the reference's."""
    from npdgm.bench.npdgm_models import build_nice, build_realnvp2d, build_vae, loss_and_grad

    rng = np.random.default_rng(4)
    xv = (rng.random((16, 30)) > 0.5).astype(np.float32)
    eps = rng.standard_normal((16, 4)).astype(np.float32)
    xn = rng.random((16, 12)).astype(np.float32)
    x2 = rng.standard_normal((32, 2)).astype(np.float32)
    _same_grads(lambda: build_vae(30, 20, 4, 0), lambda m: loss_and_grad(m, xv, eps))
    _same_grads(lambda: build_nice(12, 4, 16, 2, 0), lambda m: loss_and_grad(m, xn))
    _same_grads(lambda: build_realnvp2d(4, 16, 0), lambda m: loss_and_grad(m, x2))


def test_grad_twins_with_non_linear_parameters_and_a_layer_called_twice():
    """A VAE with a learned logvar_x, a RealNVP with ActNorm (parameters other backwards add into: the fill
    must stay whole), a Sequential that runs one Linear twice per step (second backward adds), and
    gradient accumulation over two loss_and_grad calls (zero_grad=False): the reference's gradients."""
    from npdgm import VAE
    from npdgm.models import flows
    from npdgm.nn import Activation, Linear, Sequential

    rng = np.random.default_rng(5)
    x = rng.random((16, 10)).astype(np.float32)
    eps = rng.standard_normal((16, 3)).astype(np.float32)
    x2 = rng.standard_normal((32, 2)).astype(np.float32)
    dy = rng.standard_normal((16, 10)).astype(np.float32)

    def gaussian_vae():
        return VAE(x_dim=10, hidden=(8,), z_dim=3, likelihood="gaussian", seed=0)

    def vae_accumulated(m):
        m.loss_and_grad(x, eps)
        m.loss_and_grad(x[::-1].copy(), eps, zero_grad=False)

    _same_grads(gaussian_vae, lambda m: m.loss_and_grad(x, eps))
    _same_grads(gaussian_vae, vae_accumulated)
    _same_grads(lambda: flows.realnvp2d(n_couplings=2, hidden=(8, 8), actnorm=True, seed=0, checked="off"),
                lambda m: m.loss_and_grad(x2))

    def twice():
        lin = Linear(10, 10, rng=1)
        return Sequential(lin, Activation("tanh"), lin).flatten()

    def run_twice(m):
        m.zero_grad()
        m.forward(x)
        m.backward(dy)

    _same_grads(twice, run_twice)


def test_grad_twins_skip_replaced_buffers_and_shared_parameters():
    """A gradient buffer replaced after zero_grad (as distributed.move_grads does), and two Linear layers
    sharing a weight, take the reference's adding backward."""
    from npdgm.accel import layers as wing_layers
    from npdgm.nn import Linear, Sequential

    a = Linear(3, 3, rng=0)
    b = Linear(3, 3, rng=1)
    b.W = a.W
    assert wing_layers._linear_layers(Sequential(a, b)) == []
    lin = Linear(3, 2, rng=0, dtype=np.float32)
    x, dy = np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)
    _grad_twins_only()
    try:
        lin.zero_grad()
        lin.W.grad = np.full_like(lin.W.grad, 1.0)
        lin.forward(x)
        lin.backward(dy)
    finally:
        dispatch.set_twins({})
    np.testing.assert_array_equal(lin.W.grad, 1.0 + x.T @ dy)


def test_threaded_zero_fill_on_a_fresh_thread_setting_fills_and_returns(monkeypatch):
    """fill_zero (the zero_grad twin's threaded fill) zeroes the whole buffer, also as the first user of the
    thread pool (it used to wait forever on the lock that sets the thread count)."""
    import threading

    from npdgm.accel import optim as wing_optim

    monkeypatch.setattr(wing_optim, "_threads", {"n": None, "pool": None})
    monkeypatch.setenv("NPDGM_NUM_THREADS", "2")
    buf = np.ones(wing_optim.FILL_THREADED_MIN + 5, np.float32)
    worker = threading.Thread(target=wing_optim.fill_zero, args=(buf,), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "fill_zero did not return"
    assert not buf.any()
    wing_optim.set_num_threads(None)


def test_autoregressive_solve_twin_is_the_reference_on_one_blas_thread(monkeypatch):
    """The MAF solve's twin runs the reference lines (the same bits) inside backend.one_blas_thread."""
    from npdgm import backend
    from npdgm.models import autoregressive as AR

    entered = []
    real = backend.one_blas_thread
    monkeypatch.setattr(backend, "one_blas_thread", lambda: (entered.append(1), real())[1])
    layer = AR.MAF(6, hidden=(8,), seed=1)
    z = np.random.default_rng(0).standard_normal((4, 6)).astype(layer.made.layers[0].W.data.dtype)
    want = layer._solve(z)
    assert not entered
    try:
        accel.enable("numpy")
        got = layer._solve(z)
    finally:
        accel.disable()
    assert entered == [1]
    np.testing.assert_array_equal(got, want)
