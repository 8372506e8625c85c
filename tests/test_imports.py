"""No import cycle inside npdgm: every module is parsed with ast (imports inside functions count too),
the package import graph is built, and a cycle fails the test, naming it.

Edges: ``from .x import name`` goes to the submodule ``x.name`` when there is one, else to ``x``;
``importlib.import_module(f".commands.{name}", ...)`` goes to every module under that prefix (this is
how cli.py loads the commands). The version lives in npdgm/_version.py: ``from . import __version__`` in a
module that the package facade imports is an edge back up to the facade, a cycle. Run this file as a script to
print the graph.
"""
import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "npdgm")


def _modules():
    """{module name: file path} of every .py file under npdgm/."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(d, f)
    return out


def _resolve(module, path, level, name):
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def _dynamic_prefix(call, module, path):
    """``importlib.import_module("...")`` / ``(f"...{x}", ...)``: the constant prefix, resolved, or None."""
    f = call.func
    if not (isinstance(f, ast.Attribute) and f.attr == "import_module" and call.args):
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        text = arg.value
    elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        text = arg.values[0].value
    else:
        return None
    level = len(text) - len(text.lstrip("."))
    return _resolve(module, path, level, text[level:]) if level else text


def import_graph():
    """{module: set of npdgm modules it imports}."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node.level, node.module or "")
                for a in node.names:
                    targets.append(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
            elif isinstance(node, ast.Call):
                prefix = _dynamic_prefix(node, module, path)
                if prefix and prefix.startswith("npdgm"):
                    targets = [m for m in mods if m.startswith(prefix) and m != prefix.rstrip(".")]
            for t in targets:
                while t not in mods and "." in t:  # import npdgm.x.y.name -> npdgm.x.y
                    t = t.rpartition(".")[0]
                if t in mods and t != module:
                    graph[module].add(t)
    return graph


def find_cycles(graph):
    """Every strongly connected component with more than one module, as one cycle through it (a list)."""
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(set(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in sccs:  # a shortest way back to the smallest module of the component
        start = min(comp)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in comp)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_the_graph_sees_relative_function_level_and_dynamic_imports():
    g = import_graph()
    assert "npdgm.backend" in g["npdgm.kernels.linear"]                 # from ..backend import (module level)
    assert "npdgm.models.registry" in g["npdgm.models.vae"]             # from .registry import
    assert {"npdgm.commands.vae", "npdgm.commands.flows"} <= g["npdgm.cli"]  # importlib.import_module(f"...")
    assert "npdgm.kernels.table" in g["npdgm.checks"]
    assert "npdgm._version" in g["npdgm.io"] and "npdgm" not in g["npdgm.io"]  # the version, not the facade
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_inside_npdgm():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + ";  ".join(" -> ".join(c) for c in cycles)


def test_io_and_kernels_import_no_model():
    g = import_graph()
    for low in ("npdgm.io", "npdgm.backend", *(m for m in g if m.startswith("npdgm.kernels"))):
        assert not any(t.startswith(("npdgm.models", "npdgm.commands", "npdgm.cli")) for t in g[low]), (low, g[low])


def test_command_families_import_no_private_name_of_each_other():
    """A command module takes what another family also needs from commands/common.py or a public name:
    no ``from .vae import _load_data`` (or ``vae._load_data``) between the modules of npdgm/commands/."""
    folder = os.path.join(ROOT, "commands")
    families = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    bad = []
    for fam in sorted(families):
        with open(os.path.join(folder, fam + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module in families:
                    bad += [f"{fam}: from .{node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
                elif node.module is None:
                    aliases.update({a.asname or a.name: a.name for a in node.names if a.name in families})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{fam}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, bad


REFERENCE_WING = ("npdgm.backend", "npdgm.kernels", "npdgm.nn", "npdgm.models", "npdgm.optim", "npdgm.train",
                  "npdgm.inference")


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for t in graph.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_the_reference_wing_never_imports_the_fast_wing():
    """backend, kernels, nn, models, optim, train, inference (and the package facade ``import npdgm``) reach
    no module of npdgm.accel, directly or through another module: the fast wing registers its twins from
    outside (npdgm/kernels/dispatch.py)."""
    g = import_graph()
    reference = [m for m in g if m == "npdgm" or m.startswith(REFERENCE_WING)]
    assert "npdgm.kernels.activations" in reference and "npdgm.accel" in g
    bad = {m: sorted(t for t in _reachable(g, m) if t.startswith("npdgm.accel")) for m in reference}
    assert not any(bad.values()), {m: ts for m, ts in bad.items() if ts}


def package_graph(graph):
    """The graph between top-level parts (npdgm.models.vae -> models), for reading."""
    def part(m):
        return m.split(".")[1] if m.count(".") >= 1 else "npdgm"
    out = {}
    for m, ts in graph.items():
        out.setdefault(part(m), set()).update(part(t) for t in ts if part(t) != part(m))
    return out


if __name__ == "__main__":
    g = import_graph()
    for name, ts in sorted(package_graph(g).items()):
        print(f"{name:12s} -> {', '.join(sorted(ts))}")
    print("cycles:", find_cycles(g) or "none")
    if "-v" in sys.argv:
        for m in sorted(g):
            print(m, "->", ", ".join(sorted(g[m])))
    pytest  # (imported for the test runner)
