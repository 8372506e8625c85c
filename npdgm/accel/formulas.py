"""Fused formulas: each elementwise chain of the kernels written ONCE, as expression text.

    RELU_BACKWARD = Formula("relu_backward", "dx = where(y > 0, dy, 0)", arrays="dy y")

A formula is a few lines ``name = expression`` in a small subset of Python: + - * / **, unary -,
one comparison, numbers, and the functions where(c, a, b), exp, log, log1p, expm1, sqrt, abs, tanh,
arctan. Lines are run top to bottom; a name assigned and not listed in ``outputs`` is a temporary.
Lines that use only scalar parameters (Adam's bias corrections) are scalar lines, computed once in
float64. ``rows`` names an output that is summed over axis 1 (a per-row loss). From that one text:

* :meth:`Formula.numpy` evaluates it with NumPy: the reference (tests compare it with the plain
  kernel on every input maker of the kernel table);
* :meth:`Formula.numba` compiles it into one loop (one thread, or ``prange`` over threads; every line runs per
  element, temporaries are locals, so Adam reads and writes p, m, v once) and :meth:`Formula.numexpr` runs it as one
  multithreaded numexpr pass per output: the fused CPU path (:func:`npdgm.kernels.fused.set_cpu_fused`). Numbers
  and other array-free parts are computed in float64 and cast to the arrays' dtype, so float32
  stays float32 as in NumPy;
* :meth:`Formula.cuda` writes the CUDA source of a ``cupy.ElementwiseKernel`` (or the map
  expression of a ``cupy.ReductionKernel`` for ``rows``): :data:`CUDA_PREAMBLE` defines where().

Why numba first and numexpr second, by measurement (2-core Zen 4 VM, float32, 2 threads, NumPy 2.4,
numba 0.68, numexpr 2.14; benchmarks/README.md, "Fused CPU path"):

    Adam on 0.6M parameters     plain chunked NumPy 1.47 ms   numba 0.16 ms   numexpr 5.7 ms (6.4 chunked)
    Adam on 5M parameters       plain chunked NumPy 9.4 ms    numba 2.2 ms    numexpr 35 ms (32 chunked)
    BCE gradient, 128 x 784     plain NumPy 0.27 ms           numba 0.26 ms   numexpr 1.7 ms

NumPy 2's ufuncs use SIMD (AVX-512) exp/log/sqrt; the PyPI numexpr wheel (no VML) computes them one
element at a time, so it loses to plain NumPy even though it saves the temporaries. numba's loop
is vectorized by LLVM and touches every array once, given three things (measured again on a 2-core
Zen 3 VM, one thread, CPU time under load, benchmarks/README.md): ``error_model="numpy"`` (numba's
default checks every division for zero and raises, which keeps LLVM from vectorizing: Adam on 0.65M
parameters 7.1 ms -> 0.31 ms); float32 exp and log1p as vectorizable polynomials
(:func:`numba_vector_math`: without Intel SVML numba calls libm's scalar expf / log1pf per element;
Bernoulli NLL forward 128 x 784: 2.07 ms -> 0.35 ms, plain NumPy 1.38 ms); and a row sum kept out of
the elementwise loop (a running float sum is a dependency chain LLVM may not reorder). Its costs: a
compile per formula, dtype and layout at first use (~0.3-1 s; the bench's warm-up absorbs it), ~10 us
of dispatch per call (arrays under ``fused.CPU_MIN_SIZE`` stay plain), and llvmlite's memory (~130 MB
of resident memory once imported and compiling), so it stays optional. numexpr is kept as the lighter
second engine (it may win with a VML build or on CPUs where NumPy's ufuncs have no SIMD path);
without either the switch falls back to plain NumPy.

The plain kernels keep their own NumPy code (their numbers define the reference vectors); the
formulas are written in the same operation order, so NumPy evaluation of a formula matches its
plain kernel to the last bit in most cases and to a few ulps in all.
"""
from __future__ import annotations

import ast
import math

FUNCTIONS = ("where", "exp", "log", "log1p", "expm1", "sqrt", "abs", "tanh", "arctan")
_CUDA_FUNC = {"abs": "fabs", "arctan": "atan"}
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_CMPOPS = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<="}

CUDA_PREAMBLE = """\
template <typename U> __device__ __forceinline__ U where(bool c, U a, U b) { return c ? a : b; }
"""


class FormulaError(ValueError):
    pass


_MATH = {"where": lambda c, a, b: a if c else b, "exp": math.exp, "log": math.log, "log1p": math.log1p,
         "expm1": math.expm1, "sqrt": math.sqrt, "abs": abs, "tanh": math.tanh, "arctan": math.atan}


def _scalar_eval(text, env):
    """A scalar (array-free) expression in float64."""
    return float(eval(text, {"__builtins__": {}, **_MATH}, env))


_VECTOR_MATH = {}


def numba_vector_math():
    """float32 ``exp`` and ``log1p`` for the numba loops, written so LLVM vectorizes them: numba without
    Intel SVML calls libm's scalar expf / log1pf once per element, and NumPy's SIMD exp then beats the
    fused loop (measured, Bernoulli NLL forward on 128 x 784 float32, CPU time under load: libm loop
    2.07 ms, plain NumPy 1.38 ms, this loop 0.35 ms). Cephes' expf and logf (range reduction, a
    degree-5/8 polynomial, the exponent set by bit operations) and log1p(x) = log(u) x / (u - 1),
    u = 1 + x (Goldberg): within 1 ulp (exp) and 2.3 ulps (log1p) of the float64 value, inf, -inf,
    NaN, 0, -1 and the denormal range handled as NumPy does (tests/test_fused.py). float64 loops keep
    np.exp / np.log1p. Returns {name in the generated source: njit function}; needs numba."""
    if _VECTOR_MATH:
        return _VECTOR_MATH
    import numba
    import numpy as np
    from numba.core import types
    from numba.extending import intrinsic

    def bitcast(to):                                # reinterpret the 32 bits (float32 <-> int32)
        return lambda context, builder, sig, args: builder.bitcast(args[0], context.get_value_type(to))

    @intrinsic
    def f32_bits(typingctx, x):
        return (types.int32(types.float32), bitcast(types.int32)) if x == types.float32 else None

    @intrinsic
    def bits_f32(typingctx, x):
        return (types.float32(types.int32), bitcast(types.float32)) if x == types.int32 else None

    F, I = np.float32, np.int32
    jit = numba.njit(inline="always", error_model="numpy")

    @jit
    def pow2(n):                                    # 2^n for -126 <= n <= 127, n an int32
        return bits_f32(I((n + I(127)) << I(23)))

    @jit
    def exp32(x):
        xc = min(max(x, F(-103.97208)), F(88.72284))
        n = np.floor(xc * F(1.44269504088896341) + F(0.5))
        r = xc - n * F(0.693359375)
        r = r + n * F(2.12194440e-4)
        z = r * r
        p = ((((F(1.9875691500e-4) * r + F(1.3981999507e-3)) * r + F(8.3334519073e-3)) * r
              + F(4.1665795894e-2)) * r + F(1.6666665459e-1)) * r + F(5.0000001201e-1)
        y = p * z + r + F(1.0)
        k = I(n)
        h = I(k >> I(1))                            # 2^n as 2^h 2^(n-h): no overflow at n = 128, denormals below -126
        y = y * pow2(h) * pow2(I(k - h))
        y = F(np.inf) if x > F(88.72284) else y
        return F(0.0) if x < F(-103.97208) else y

    @jit
    def log32(u):                                   # u > 0 finite; the callers handle the rest
        bits = f32_bits(u)
        e = I(((bits >> I(23)) & I(0xff)) - I(126))
        m = bits_f32(I((bits & I(0x007fffff)) | I(0x3f000000)))      # u = m 2^e, m in [0.5, 1)
        small = m < F(0.707106781186547524)
        e = I(e - I(1)) if small else e
        m = (m + m - F(1.0)) if small else (m - F(1.0))
        z = m * m
        y = ((((((((F(7.0376836292e-2) * m - F(1.1514610310e-1)) * m + F(1.1676998740e-1)) * m
                   - F(1.2420140846e-1)) * m + F(1.4249322787e-1)) * m - F(1.6668057665e-1)) * m
                 + F(2.0000714765e-1)) * m - F(2.4999993993e-1)) * m + F(3.3333331174e-1)) * m * z
        fe = F(e)
        y = y + fe * F(-2.12194440e-4)
        y = y - F(0.5) * z
        return (m + y) + fe * F(0.693359375)

    @jit
    def log1p32(x):
        u = F(1.0) + x
        r = log32(u) * (x / (u - F(1.0)))
        r = x if u == F(1.0) else r                 # |x| below half an ulp of 1 (and -0.0 stays -0.0)
        r = F(-np.inf) if u == F(0.0) else r
        r = F(np.nan) if u < F(0.0) else r
        return u if u == F(np.inf) else r           # +inf; NaN runs through the arithmetic

    _VECTOR_MATH.update({"_exp32": exp32, "_log1p32": log1p32})
    return _VECTOR_MATH


def _numba_layout(arrays, shape, rows):
    """How the numba loop walks ``arrays`` (broadcast to ``shape``): "flat" when every one has the
    result's shape and is C-contiguous (and no output is a row sum); else, for a 2-D result, one of
    "full" (the result's shape, any strides), "col" ((B, 1)), "row" ((D,) or (1, D)) per array; None
    for anything else (the NumPy fallback)."""
    if not rows and all(a.shape == shape and a.flags.c_contiguous for a in arrays):
        return "flat"
    if len(shape) != 2:
        return None
    kinds = []
    for a in arrays:
        if a.shape == shape:
            kinds.append("full")
        elif a.shape == (shape[0], 1):
            kinds.append("col")
        elif a.shape in ((shape[1],), (1, shape[1])):
            kinds.append("row")
        else:
            return None
    return tuple(kinds)


def _dense_order(arrays, shape):
    """The axis order in which every array of ``shape`` is C-contiguous (all share one permuted dense memory
    layout, e.g. the (B, C, H, W) view of a (C, H, W, B) array), or None."""
    a0 = arrays[0]
    if a0.ndim < 2 or any(a.shape != shape for a in arrays):
        return None
    order = tuple(sorted(range(a0.ndim), key=lambda k: -a0.strides[k]))
    return order if all(a.transpose(order).flags.c_contiguous for a in arrays) else None


def _names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _hoist(tree, scalar_names, prefix, consts):
    """``tree`` with every array-free part (only names in ``scalar_names``; function calls stay, their
    arguments are searched) replaced by a name ``<prefix><k>``, appended to ``consts`` as (name, source)."""
    class Hoist(ast.NodeTransformer):
        def visit(self, n):
            if isinstance(n, ast.Call):
                n.args = [self.visit(a) for a in n.args]
                return n
            if isinstance(n, ast.expr) and _names(n) - set(FUNCTIONS) <= scalar_names:
                consts.append((f"{prefix}{len(consts)}", ast.unparse(n)))
                return ast.Name(id=consts[-1][0], ctx=ast.Load())
            return self.generic_visit(n)

    return Hoist().visit(tree)


def _check(node, where):
    """Reject anything outside the formula language (so every engine can run what parses)."""
    for n in ast.walk(node):
        ok = isinstance(n, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, ast.Compare, ast.Call, ast.Name,
                            ast.Load, ast.Constant) + tuple(_BINOPS) + tuple(_CMPOPS))
        if isinstance(n, ast.Constant) and (isinstance(n.value, bool) or not isinstance(n.value, (int, float))):
            ok = False
        if isinstance(n, ast.Compare) and len(n.ops) != 1:
            ok = False
        if isinstance(n, ast.Call) and (not isinstance(n.func, ast.Name) or n.func.id not in FUNCTIONS
                                        or n.keywords or len(n.args) != (3 if n.func.id == "where" else 1)):
            raise FormulaError(f"{where}: functions are {', '.join(FUNCTIONS)} (where takes 3 arguments)")
        if not ok:
            raise FormulaError(f"{where}: {type(n).__name__} is not in the formula language")


def _substitute(node, env):
    """``node`` with every Name in ``env`` replaced by (a copy of) its expression."""
    class Sub(ast.NodeTransformer):
        def visit_Name(self, n):
            return _substitute(env[n.id], {}) if n.id in env else n
    import copy
    return Sub().visit(copy.deepcopy(node))


class Formula:
    """One fused elementwise formula (see the module docstring).

    ``arrays``: the array inputs (space-separated names, in call order); ``scalars``: scalar
    parameters; ``outputs``: assigned names returned as new arrays (default: every assigned name
    that is not a temporary, i.e. the last line's, plus the ``inplace`` arrays); ``inplace``: input
    arrays the formula assigns (updated in place: Adam's p, m, v); ``rows``: an output summed over
    axis 1."""

    def __init__(self, name, text, arrays, scalars="", outputs=None, inplace="", rows=None):
        self.name, self.text = name, "\n".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())
        self.arrays, self.scalars = tuple(arrays.split()), tuple(scalars.split())
        self.inplace = tuple(inplace.split())
        self.statements = []                        # [(lhs, ast expression, is_scalar_line)]
        known_scalar, known = set(self.scalars), set(self.arrays) | set(self.scalars)
        for k, line in enumerate(self.text.splitlines()):
            code = line.split("#")[0].strip()
            if not code:
                continue
            lhs, eq, rhs = code.partition("=")
            lhs = lhs.strip()
            where = f"formula {name!r} line {k + 1} ({line!r})"
            if not eq or not lhs.isidentifier():
                raise FormulaError(f"{where}: expected 'name = expression'")
            try:
                expr = ast.parse(rhs.strip(), mode="eval")
            except SyntaxError as e:
                raise FormulaError(f"{where}: {e.msg}") from None
            _check(expr, where)
            used = _names(expr) - set(FUNCTIONS)
            if used - known:
                raise FormulaError(f"{where}: unknown name(s) {sorted(used - known)}")
            if lhs in self.arrays and lhs not in self.inplace or lhs in self.scalars:
                raise FormulaError(f"{where}: {lhs!r} is an input; list it in inplace= to update it")
            if lhs == "i" or lhs.startswith("_"):
                raise FormulaError(f"{where}: {lhs!r} is reserved in CUDA kernels")
            is_scalar = used <= known_scalar
            if is_scalar:
                known_scalar.add(lhs)
            self.statements.append((lhs, expr.body, is_scalar))
            known.add(lhs)
        assigned = [s[0] for s in self.statements if not s[2]]
        self.outputs = tuple(outputs.split()) if outputs is not None else tuple(
            n for n in assigned if n not in self.inplace and n == assigned[-1]) + self.inplace
        self.rows = rows
        missing = [o for o in self.outputs if o not in assigned]
        if missing or (rows and rows not in self.outputs):
            raise FormulaError(f"formula {name!r}: outputs {missing or [rows]} are never assigned")

    def __repr__(self):
        return f"Formula({self.name!r}, {self.text!r})"

    # -- NumPy: the reference ------------------------------------------------------------------
    def numpy(self, **values):
        """Evaluate with NumPy (whole-array operations). ``values``: every array and scalar by name
        (arrays broadcast as in NumPy). Returns {output: array}; ``inplace`` arrays are written."""
        import numpy as np

        env = {"where": np.where, "exp": np.exp, "log": np.log, "log1p": np.log1p, "expm1": np.expm1,
               "sqrt": np.sqrt, "abs": np.abs, "tanh": np.tanh, "arctan": np.arctan}
        env.update(self._bind(values))
        dtype = next(np.asarray(values[a]).dtype for a in self.arrays)
        for lhs, expr, is_scalar in self.statements:
            v = eval(compile(ast.Expression(expr), self.name, "eval"), env)  # the language is checked above
            if is_scalar:
                v = float(v)                        # a Python float: weak, float32 arrays stay float32
            else:
                v = np.asarray(v, dtype=dtype) if np.ndim(v) == 0 else v.astype(dtype, copy=False)
            if lhs in self.inplace:
                values[lhs][...] = v
                v = values[lhs]
            env[lhs] = v
        return self._finish(env, lambda a: a.sum(axis=1))

    def _bind(self, values):
        missing = [n for n in self.arrays + self.scalars if n not in values]
        if missing:
            raise TypeError(f"formula {self.name!r} needs {missing}")
        env = {n: values[n] for n in self.arrays}
        env.update({n: float(values[n]) for n in self.scalars})
        return env

    def _finish(self, env, rowsum):
        return {o: rowsum(env[o]) if o == self.rows else env[o] for o in self.outputs}

    # -- expressions per output (temporaries inlined), shared by numexpr and CUDA reductions ---
    def expressions(self):
        """[(lhs, expression text, is_scalar)]: the scalar lines, then one line per assigned array
        with the temporaries inlined (so each can run as one numexpr call or a reduction's map)."""
        out, env, poisoned = [], {}, set()
        for lhs, expr, is_scalar in self.statements:
            if is_scalar:
                out.append((lhs, ast.unparse(expr), True))
                continue
            bad = _names(expr) & poisoned
            if bad:
                raise FormulaError(f"formula {self.name!r}: temporary {sorted(bad)} used in {lhs!r} reads an "
                                   f"array that an earlier line updated in place")
            e = _substitute(expr, env)
            if lhs in self.outputs:
                out.append((lhs, ast.unparse(e), False))
                poisoned |= {t for t, te in env.items() if lhs in _names(te)}
            else:
                env[lhs] = e
        return out

    # -- numexpr: the fused CPU path -----------------------------------------------------------
    def numexpr(self, out=None, **values):
        """Evaluate with numexpr: one multithreaded pass per output array (temporaries inlined).
        Parts without arrays (numbers, ``1 - b1``, Adam's bias corrections) are computed once in
        float64 and enter as the arrays' dtype (numexpr would compute float32 * 0.5 in float64).
        ``out``: {output: array} to write into (fresh arrays otherwise)."""
        import numexpr as ne

        env = self._bind(values)
        dtype = next(values[a].dtype for a in self.arrays)
        out = dict(out or {})
        for lhs, text, hoisted, is_scalar in self._ne_program():
            if is_scalar:
                env[lhs] = _scalar_eval(text, env)
                continue
            local = {n: env[n] for n in self._ne_names[lhs]}
            local.update({k: dtype.type(_scalar_eval(t, env)) for k, t in hoisted.items()})
            dst = values[lhs] if lhs in self.inplace else out.get(lhs)
            env[lhs] = ne.evaluate(text, local_dict=local, out=dst, casting="same_kind")
        return self._finish(env, lambda a: a.sum(axis=1))

    def _ne_program(self):
        """[(lhs, numexpr text, {name: scalar text}, is_scalar)]: every array-free part of an array
        line hoisted into a named scalar (cached)."""
        if getattr(self, "_ne", None) is None:
            scalar_names = set(self.scalars) | {s[0] for s in self.statements if s[2]}
            prog, names, consts = [], {}, []
            for lhs, text, is_scalar in self.expressions():
                hoisted = {}
                if not is_scalar:
                    start = len(consts)
                    tree = _hoist(ast.parse(text, mode="eval"), scalar_names, "_s", consts)
                    hoisted = dict(consts[start:])
                    text = ast.unparse(tree)
                    names[lhs] = _names(tree) - set(FUNCTIONS) - set(hoisted)
                prog.append((lhs, text, hoisted, is_scalar))
            self._ne, self._ne_names = prog, names
        return self._ne

    # -- numba: the fused CPU path's compiled loop ---------------------------------------------
    def numba(self, out=None, parallel=False, **values):
        """Evaluate as one compiled numba loop: every line runs per element (temporaries are locals, a
        ``rows`` output is summed per row in float64), so Adam's p, m, v stream through memory once
        and no (B, D) temporary exists. Inputs are full arrays (any row stride), (B, 1) columns or (D,)
        rows of the (B, D) result; broadcasts beyond that (eps (K, B, Z) against mu (B, Z)) run
        :meth:`numpy`. ``parallel``: split the loop over numba's threads (``prange``); the default is
        one thread. Parts without arrays are float64 scalars cast to the arrays' dtype, as in
        :meth:`numexpr`. The loop compiles on first use per dtype and layout (~0.3-1 s).
        Returns {output: array} (:meth:`numba_call` is the same, positional, for the kernels)."""
        res = self.numba_call([values[a] for a in self.arrays], values, parallel, out)
        return dict(zip(self.outputs, res))

    def numba_call(self, arrays, scalars, parallel=False, out=None):
        """:meth:`numba` with the arrays in the formula's order and the scalars in a dict; returns the
        outputs as a tuple in the formula's output order (the fused kernels' hot path: no dicts)."""
        import numpy as np

        a0 = arrays[0]
        dtype, shape = a0.dtype, a0.shape
        if any(a.shape != shape for a in arrays):
            shape = np.broadcast_shapes(*(a.shape for a in arrays))
        layout = _numba_layout(arrays, shape, bool(self.rows))
        if layout is None and out is None and not self.rows:
            order = _dense_order(arrays, shape)
            if order is not None:       # one permuted dense layout (a conv twin's (C, H, W, B) memory): walk it flat
                res = self.numba_call([a.transpose(order) for a in arrays], scalars, parallel)
                back = tuple(np.argsort(order))
                return tuple(r.transpose(back) for r in res)
        if layout is None:
            res = self.numpy(**dict(zip(self.arrays, arrays)), **{k: scalars[k] for k in self.scalars})
            return tuple(res[o] for o in self.outputs)
        res, new = [], []
        for o in self.outputs:
            if o in self.inplace:
                res.append(arrays[self.arrays.index(o)])
            else:
                r = out[o] if out and o in out else np.empty(shape[:1] if o == self.rows else shape, dtype)
                res.append(r)
                new.append(r)
        if layout == "flat":
            args = [a.reshape(-1) for a in arrays] + [r.reshape(-1) for r in new]
            dims = (a0.size,)
        else:
            args = [a.reshape(-1) if k == "row" else a for a, k in zip(arrays, layout)] + new
            dims = shape
        self._numba_kernel(layout, bool(parallel), dtype.char)(*dims, *args, *self._numba_constants(scalars, dtype))
        return tuple(res)

    def _numba_constants(self, values, dtype):
        """The array-free parts of the array lines, in float64, cast to ``dtype`` (one generated Python
        function per formula: the scalar lines, then one value per hoisted part; without scalar
        parameters the values are cached per dtype)."""
        cache = self.__dict__.setdefault("_consts_cache", {})
        if not self.scalars and dtype.char in cache:
            return cache[dtype.char]
        fn = cache.get("fn")
        if fn is None:
            lines, _ = self._numba_lines()
            consts = [f"_T({t})" for _, t in self._numba_consts]
            ret = f"    return ({', '.join(consts)}{',' if consts else ''})"
            src = "\n".join([f"def _consts(_T, {', '.join(self.scalars) or '_unused=0'}):"]
                            + [f"    {s}" for s in lines] + [ret])
            ns = dict(_MATH)
            exec(compile(src, f"<formula {self.name} constants>", "exec"), ns)
            fn = cache["fn"] = ns["_consts"]
        res = fn(dtype.type, *(float(values[s]) for s in self.scalars))
        if not self.scalars:
            cache[dtype.char] = res
        return res

    def _numba_lines(self):
        """(scalar lines as Python source, array lines [(lhs, expression source)]) with every array-free
        part of an array line hoisted into ``_c<k>`` (listed in ``self._numba_consts``); cached."""
        if getattr(self, "_nb", None) is None:
            scalar_names = set(self.scalars) | {s[0] for s in self.statements if s[2]}
            scalar_lines, array_lines, consts = [], [], []
            import copy
            for lhs, expr, is_scalar in self.statements:
                if is_scalar:
                    scalar_lines.append(f"{lhs} = {ast.unparse(expr)}")
                else:
                    array_lines.append((lhs, _hoist(copy.deepcopy(expr), scalar_names, "_c", consts)))
            self._nb, self._numba_consts = (scalar_lines, array_lines), consts
        return self._nb

    def numba_source(self, layout="flat", dtype="float64"):
        """The Python source of the numba loop for ``layout``: "flat" (every array the result's shape,
        C-contiguous, walked as 1-D), or a tuple with one of "full", "col", "row" per input array (the
        loop over rows x columns of the result; a ``rows`` formula always takes this form). For
        float32, exp and log1p are the vectorizable ``_exp32`` / ``_log1p32`` (:func:`numba_vector_math`)."""
        vector = {"exp": "_exp32", "log1p": "_log1p32"} if str(dtype) in ("float32", "f") else {}
        _, lines = self._numba_lines()
        ins = list(self.arrays)
        outs = [o for o in self.outputs if o not in self.inplace]
        flat = layout == "flat"
        kinds = dict(zip(ins, ["full"] * len(ins) if flat else layout))
        idx = {"full": "[_i]" if flat else "[_r, _c]", "col": "[_r, 0]", "row": "[_c]"}
        cur = {a: a + idx[kinds[a]] for a in ins}   # name -> its value in the loop body

        class Loop(ast.NodeTransformer):
            def visit_Call(self, n):
                n.args = [self.visit(a) for a in n.args]
                if n.func.id == "where":
                    return ast.IfExp(test=n.args[0], body=n.args[1], orelse=n.args[2])
                name = n.func.id
                n.func = ast.Name(id="abs" if name == "abs" else vector.get(name, f"np.{name}"), ctx=ast.Load())
                return n

            def visit_Name(self, n):
                return ast.parse(cur[n.id], mode="eval").body if n.id in cur else n

        body, post = [], []
        for lhs, expr in lines:
            body.append(f"_v_{lhs} = {ast.unparse(Loop().visit(ast.parse(ast.unparse(expr), mode='eval')))}")
            cur[lhs] = f"_v_{lhs}"
            if lhs == self.rows:
                body.append(f"_row[_c] = _v_{lhs}")
            elif lhs in self.outputs:
                body.append(f"{lhs}{idx['full']} = _v_{lhs}")
        consts = [c for c, _ in self._numba_consts]
        if flat:
            head = ["for _i in prange(_n):"]
            dims = "_n"
        else:
            # a row sum: the row's values into a scratch row first (that loop vectorizes; a running sum
            # would not), then summed in float64 with four partial sums (a fixed order: the same bits
            # on one thread or many)
            scratch = [f"    _row = np.empty(_n1, {self.rows}.dtype)"] if self.rows else []
            head = ["for _r in prange(_n0):"] + scratch + ["    for _c in range(_n1):"]
            if self.rows:
                post = ["    _a0 = _a1 = _a2 = _a3 = 0.0",
                        "    _m = _n1 - _n1 % 4",
                        "    for _c in range(0, _m, 4):",
                        "        _a0 += _row[_c]",
                        "        _a1 += _row[_c + 1]",
                        "        _a2 += _row[_c + 2]",
                        "        _a3 += _row[_c + 3]",
                        "    for _c in range(_m, _n1):",
                        "        _a0 += _row[_c]",
                        f"    {self.rows}[_r] = (_a0 + _a1) + (_a2 + _a3)"]
            dims = "_n0, _n1"
        pad = "    " * (1 if flat else 2) + "    "
        return "\n".join([f"def _loop({', '.join([dims] + ins + outs + consts)}):"]
                         + ["    " + ln for ln in head] + [pad + b for b in body] + ["    " + ln for ln in post])

    def _numba_kernel(self, layout, parallel, dtype):
        cache = self.__dict__.setdefault("_numba", {})
        if (layout, parallel, dtype) not in cache:
            import numba
            import numpy as np

            if parallel and numba.config.THREADING_LAYER == "default":   # not set by NUMBA_THREADING_LAYER
                # numba's own pool sleeps between loops; OpenMP's spins and then fights OpenBLAS's GEMM
                # threads for the cores (measured: the OpenMP layer made a VAE step 2-3x slower on 2 cores)
                numba.config.THREADING_LAYER = "workqueue"

            ns = {"np": np, "prange": numba.prange, **numba_vector_math()}
            exec(compile(self.numba_source(layout, dtype), f"<formula {self.name}>", "exec"), ns)
            # error_model="numpy": x / 0 gives inf/nan as in NumPy, no ZeroDivisionError check per
            # division, so LLVM can vectorize the loop (measured: Adam on 0.65M float32 parameters
            # 7.1 ms with numba's default "python" error model, 0.31 ms with "numpy"). fastmath stays
            # off: the loop computes the formula's own roundings, as the NumPy reference does.
            cache[(layout, parallel, dtype)] = numba.njit(parallel=parallel, fastmath=False, nogil=True,
                                                          error_model="numpy")(ns["_loop"])
        return cache[(layout, parallel, dtype)]

    # -- CUDA: the CuPy kernels ----------------------------------------------------------------
    def _c(self, node, scalar_names, T):
        """C source of one expression; in array context (T = "T") numbers and scalars are cast to T."""
        c = lambda n: self._c(n, scalar_names, T)  # noqa: E731
        if T != "double" and not isinstance(node, ast.Constant) and _names(node) - set(FUNCTIONS) <= scalar_names:
            return f"(({T}){self._c(node, scalar_names, 'double')})"    # array-free: computed in double
        if isinstance(node, ast.Constant):
            v = repr(float(node.value))
            return f"(({T}){v})" if T != "double" else v
        if isinstance(node, ast.Name):
            return f"(({T}){node.id})" if node.id in scalar_names and T != "double" else node.id
        if isinstance(node, ast.UnaryOp):
            return f"(-{c(node.operand)})"
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                return f"pow({c(node.left)}, {c(node.right)})"
            return f"({c(node.left)} {_BINOPS[type(node.op)]} {c(node.right)})"
        if isinstance(node, ast.Compare):
            return f"({c(node.left)} {_CMPOPS[type(node.ops[0])]} {c(node.comparators[0])})"
        if isinstance(node, ast.Call):
            return f"{_CUDA_FUNC.get(node.func.id, node.func.id)}({', '.join(c(a) for a in node.args)})"
        raise FormulaError(f"cannot write {ast.dump(node)} as C")  # unreachable: _check ran

    def cuda(self):
        """The CUDA pieces of this formula: {"in_params", "out_params", "operation", "name",
        "preamble"} for ``cupy.ElementwiseKernel``, or for a ``rows`` formula {"in_params",
        "out_params", "map_expr", "reduce_expr", "post_map_expr", "identity", "name", "preamble"}
        for ``cupy.ReductionKernel`` (arrays are type T, scalars float64)."""
        scalar_names = set(self.scalars) | {s[0] for s in self.statements if s[2]}
        ins = [f"T {a}" for a in self.arrays if a not in self.inplace] + [f"float64 {s}" for s in self.scalars]
        kname = f"npdgm_{self.name}"
        if self.rows:
            (expr,) = [ast.parse(t, mode="eval").body for lhs, t, s in self.expressions() if lhs == self.rows]
            return {"in_params": ", ".join(ins), "out_params": f"T {self.rows}",
                    "map_expr": self._c(expr, scalar_names, "T"), "reduce_expr": "a + b",
                    "post_map_expr": f"{self.rows} = a", "identity": "0", "name": kname,
                    "preamble": CUDA_PREAMBLE}
        lines = []
        for lhs, expr, is_scalar in self.statements:
            if is_scalar:
                lines.append(f"const double {lhs} = {self._c(expr, scalar_names, 'double')};")
            elif lhs in self.outputs:
                lines.append(f"{lhs} = {self._c(expr, scalar_names, 'T')};")
            else:
                lines.append(f"const T {lhs} = {self._c(expr, scalar_names, 'T')};")
        outs = [f"T {o}" for o in self.outputs if o not in self.inplace] + [f"T {a}" for a in self.inplace]
        return {"in_params": ", ".join(ins), "out_params": ", ".join(outs), "operation": "\n".join(lines),
                "name": kname, "preamble": CUDA_PREAMBLE}


# == the formulas (named after the plain kernel each one fuses) =====================================
def _f(*args, **kw):
    f = Formula(*args, **kw)
    FORMULAS[f.name] = f
    return f


FORMULAS = {}

# activations (npdgm/kernels/activations.py): dx = dy * f'(.)
# relu forward as max(x, 0) bit for bit: x <= 0 (-0.0 included) gives +0, NaN stays NaN. One pass: NumPy 2.4's
# maximum(x, 0) against a scalar has no SIMD loop (512 x 256 float32: 65 us; this loop ~10 us, measured)
_f("relu_forward", "y = where(x <= 0, 0, x)", "x")
_f("relu_backward", "dx = where(y > 0, dy, 0)", "dy y")
# a Linear layer's bias add and the ReLU after it, in place on the product h = x @ W (b: the (D,) bias row);
# relu(h + b) bit for bit (npdgm/kernels/linear.py linear_relu_forward): one pass instead of two
_f("bias_relu_forward", """
   y = h + b
   h = where(y <= 0, 0, y)""", "h b", inplace="h")
_f("leaky_relu_backward", "dx = where(x > 0, dy, dy * slope)", "dy x", "slope")
_f("tanh_backward", "dx = dy * (1 - y * y)", "dy y")
_f("sigmoid_forward", """
   e = exp(-abs(x))                       # <= 1: no overflow in either tail
   y = where(x >= 0, 1, e) / (1 + e)""", "x")
_f("sigmoid_backward", "dx = dy * y * (1 - y)", "dy y")
_f("softplus_forward", "y = log1p(exp(-abs(x))) + where(x > 0, x, 0)", "x")
_f("softplus_backward", """
   e = exp(-abs(x))
   dx = dy * (where(x >= 0, 1, e) / (1 + e))      # dy * sigmoid(x)""", "dy x")
_f("elu_backward", "dx = where(x > 0, dy, dy * alpha * exp(where(x < 0, x, 0)))", "dy x", "alpha")

# losses (npdgm/kernels/losses.py): Bernoulli NLL from logits, per row; dloss enters as a (B, 1) column
_f("bernoulli_nll_forward", "nll = log1p(exp(-abs(logits))) + where(logits > 0, logits, 0) - x * logits",
   "logits x", rows="nll")
_f("bernoulli_nll_backward", """
   e = exp(-abs(logits))
   dlogits = (where(logits >= 0, 1, e) / (1 + e) - x) * dloss      # (sigmoid(l) - x) dloss""",
   "dloss logits x")

# Gaussian q(z|x) (npdgm/kernels/gaussian.py)
_f("reparameterize_forward", "z = mu + exp(0.5 * logvar) * eps", "mu logvar eps")
_f("reparameterize_backward", "dlogvar = dz * eps * (0.5 * exp(0.5 * logvar))", "dz logvar eps")
_f("kl_std_normal_forward", "kl = 0.5 * (mu * mu + exp(logvar) - 1 - logvar)", "mu logvar", rows="kl")
_f("kl_std_normal_backward", """
   dmu = dkl * mu
   dlogvar = dkl * 0.5 * (exp(logvar) - 1)""", "dkl mu logvar", outputs="dmu dlogvar")

# affine coupling on the transformed half (npdgm/kernels/coupling.py); dlogdet enters as a (B, 1) column
_f("affine_coupling_forward", "yb = xb * exp(s) + t", "xb s t")
_f("affine_coupling_backward", """
   dxb = dyb * exp(s)
   ds = dxb * xb + dlogdet""", "dyb dlogdet xb s", outputs="dxb ds")
_f("affine_coupling_inverse", "xb = (yb - t) * exp(-s)", "yb s t")
_f("affine_coupling_inverse_backward", """
   dyb = dxb * exp(-s)
   ds = -(dxb * xb) - dlogdet_inv
   dt = -dyb""", "dxb dlogdet_inv xb s", outputs="dyb ds dt")

# the standard logistic prior's log-density per row (npdgm/kernels/coupling.py; NICE's prior): one pass
# instead of six NumPy passes over the (B, D) latent
_f("logistic_logprob_forward", "lp = -(abs(z) + 2 * log1p(exp(-abs(z))))", "z", rows="lp")

# Adam / AdamW (npdgm/optim.py): l2 = wd, decay = 1 for Adam; l2 = 0, decay = 1 - lr wd for AdamW.
_f("adam", """
   step = lr * sqrt(1 - b2 ** t) / (1 - b1 ** t)       # bias corrections folded into two scalars
   eps_hat = eps * sqrt(1 - b2 ** t)
   gi = g + l2 * p
   m = b1 * m + (1 - b1) * gi
   v = b2 * v + (1 - b2) * (gi * gi)
   p = decay * p - step * (m / (sqrt(v) + eps_hat))""", "g p m v", "t lr b1 b2 eps l2 decay", inplace="p m v")
