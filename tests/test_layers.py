"""alignkit's import graph: layers point down only, no cycles, no method module imports another.

Every import counts, also those inside functions: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alignkit"

# the first component under alignkit/ -> layer (0 = bottom); a new module must be placed here
LAYERS = {
    "errors": 0, "config": 0, "data": 0, "losses": 0, "gguf": 0, "assets": 0, "models": 0, "testing": 0,
    "lazy": 0,
    "training": 1, "forward": 1, "reference": 1, "rollout": 1, "rewards": 1, "critic": 1, "launch": 1,
    "convert": 1,
    "methods": 2,
    "pipeline": 3, "chat": 3, "generate": 3, "estimate": 3, "serve": 3,
    "api": 3, "cli": 3, "__init__": 3, "__main__": 3,
}
LAYER_NAMES = ["bottom (config, data, models, losses)", "middle (training loop, samplers, rewards, reference)",
               "methods", "face (cli, api)"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str) -> str | None:
    """The alignkit module ``name`` refers to (a module, a package, or the package holding an attribute)."""
    parts = name.split(".")
    while parts:
        base = PACKAGE.parent.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return None


def imports_of(path: Path) -> set[str]:
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "alignkit":
                target = resolve(name)
                if target and target != me:
                    found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    assert key in LAYERS, f"{module}: not placed in a layer; add {key!r} to LAYERS in tests/test_layers.py"
    return LAYERS[key]


def test_every_module_is_in_a_layer():
    for module in graph():
        layer(module)


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYER_NAMES[layer(m)]}) imports {t} ({LAYER_NAMES[layer(t)]})"
            for m, targets in g.items() for t in sorted(targets) if layer(t) > layer(m)]


def test_imports_point_down_only():
    upward = upward_imports(graph())
    assert not upward, "\n".join(upward)


def test_no_method_module_imports_another():
    bad = [f"{m} imports {t}" for m, targets in graph().items() if m.startswith("alignkit.methods.")
           for t in targets if t.startswith("alignkit.methods.")]
    registry = graph()["alignkit.methods"]
    bad += [f"the registry alignkit.methods imports {t}" for t in registry if t.startswith("alignkit.methods.")]
    assert not bad, "\n".join(bad)


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The test above can fail: a fake package with both faults is caught."""
    fake = tmp_path / "alignkit"
    (fake / "methods").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "config.py").write_text("from alignkit.methods import sft\n")
    (fake / "methods" / "__init__.py").write_text("")
    (fake / "methods" / "sft.py").write_text("def f():\n    import alignkit.config\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    g = graph()
    assert g["alignkit.config"] == {"alignkit.methods.sft"}  # the function-level import counts too
    assert find_cycles(g) == [["alignkit.config", "alignkit.methods.sft"]]
    assert upward_imports(g) == ["alignkit.config (bottom (config, data, models, losses)) imports "
                                 "alignkit.methods.sft (methods)"]
