"""No module of vgg_flax imports one that imports it back, at module level or inside a function.

The graph is read from the source with ``ast`` (nothing is imported): an edge for every
``import vgg_flax.x`` / ``from vgg_flax.x import y`` / relative import, wherever it stands. Importing
``vgg_flax.a.b`` from outside ``vgg_flax.a`` also runs ``vgg_flax/a/__init__.py``, so it is an edge to
that package as well; a module inside the package does not count its own package (Python has
already started it). The root package ``vgg_flax`` only re-exports: ``from vgg_flax import X``
counts as an edge to it only when X is not a submodule.
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vgg_flax"


def modules(root: Path = PKG) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The vgg_flax modules ``name`` imports anywhere in its source, resolved to known modules."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[:len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names} & known.keys()
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
    out = set()
    own_pkgs = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)} | {name}
    for mod in found:
        if not (mod == "vgg_flax" or mod.startswith("vgg_flax.")):
            continue
        while mod not in known:
            mod = mod.rsplit(".", 1)[0]
        out.add(mod)
        parent = mod
        while parent.count(".") > 1:  # sub-packages' __init__ run first
            parent = parent.rsplit(".", 1)[0]
            out.add(parent)
    return out - own_pkgs


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_cycles(tmp_path):
    """It can fail: a function-local import back, and a cycle through a package's __init__."""
    pkg = tmp_path / "vgg_flax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from vgg_flax import b\n")
    (pkg / "b.py").write_text("def f():\n    from vgg_flax.a import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from vgg_flax.sub.x import y\n")
    (pkg / "sub" / "x.py").write_text("from . import z\n")
    (pkg / "sub" / "z.py").write_text("")
    (pkg / "c.py").write_text("import vgg_flax.sub.z\n")
    known = modules(pkg)
    g = {name: imports(name, path, known) for name, path in known.items()}
    assert g["vgg_flax.c"] == {"vgg_flax.sub", "vgg_flax.sub.z"}
    assert g["vgg_flax.sub.x"] == {"vgg_flax.sub.z"}
    assert find_cycle(g) == ["vgg_flax.a", "vgg_flax.b", "vgg_flax.a"]
    (pkg / "sub" / "z.py").write_text("def g():\n    import vgg_flax.c\n")
    g = {name: imports(name, path, known) for name, path in known.items()}
    g.pop("vgg_flax.a")
    assert find_cycle(g) == ["vgg_flax.c", "vgg_flax.sub", "vgg_flax.sub.x", "vgg_flax.sub.z",
                             "vgg_flax.c"]


@pytest.mark.parametrize("name", ["vgg_flax.images", "vgg_flax.published"])
def test_modules_are_not_shadowed(name):
    """``vgg_flax.preprocess`` / ``vgg_flax.pretrained`` are functions; their modules have other
    names, so both are reachable."""
    import importlib

    import vgg_flax
    module = importlib.import_module(name)
    assert getattr(vgg_flax, name.split(".")[1]) is module
    assert callable(vgg_flax.preprocess) and vgg_flax.preprocess.__module__ == "vgg_flax.images"
    assert callable(vgg_flax.pretrained) and vgg_flax.pretrained.__module__ == "vgg_flax.published"


@pytest.mark.parametrize("name", ["vgg_flax", "vgg_flax.convert"])
def test_all_is_all_that_is_exported(name):
    """Every public attribute of the package that is not a submodule is in ``__all__`` (which
    may list a submodule it documents, ``vgg_flax.losses``), and ``__all__`` names only what is
    there: one documented surface, no internals."""
    import importlib
    import inspect
    module = importlib.import_module(name)
    public = {n for n, v in vars(module).items()
              if not n.startswith("_") and not inspect.ismodule(v)}
    assert public <= set(module.__all__), public - set(module.__all__)
    assert all(hasattr(module, n) for n in module.__all__)
