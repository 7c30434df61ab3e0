"""The tree's rules, checked from the source (static: import statements, function-level ones
included): no import circle anywhere in otseg/, train/, app/; the wings of otseg/ import only
downward; otseg/ never imports the demo, the trainer, gradio or accelerate."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("otseg", "train", "app")

# otseg's layers, bottom first: a module may import its own layer or lower ones only.
LAYERS = (
    {
        "otseg.errors",
        "otseg._compat",
        "otseg.data.classes",
        "otseg.data.prompts",
        "otseg.draw",
        "otseg.progress",
    },
    {"otseg.config", "otseg.registry", "otseg.vocabulary", "otseg.metrics", "otseg.data"},
    {"otseg.nn"},
    {"otseg.weights"},
    {"otseg.models"},
    {"otseg.inference"},
    {"otseg", "otseg.cli", "otseg.__main__"},
)
FORBIDDEN_IN_LIBRARY = ("gradio", "accelerate", "app", "train", "spaces")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        targets = set()
        for target in imported(path):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def layer(module: str) -> int:
    """Index in LAYERS of the most specific prefix that names ``module``'s layer."""
    best, depth = None, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, f"{module} belongs to no layer; add it to LAYERS"
    return best


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_library_wings_import_only_downward():
    upward = [
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src, targets in graph().items()
        if src.split(".")[0] == "otseg"
        for dst in targets
        if dst.split(".")[0] == "otseg" and layer(dst) > layer(src)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", sorted((ROOT / "otseg").rglob("*.py")), ids=str)
def test_library_never_imports_the_demo_or_the_trainer(path):
    bad = {n for n in imported(path) if n.split(".")[0] in FORBIDDEN_IN_LIBRARY}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The graph code itself: a planted circle and a planted upward import are found."""
    for name, text in {
        "otseg/__init__.py": "",
        "otseg/nn/__init__.py": "",
        "otseg/nn/a.py": "from ..inference import b\n",
        "otseg/inference/__init__.py": "",
        "otseg/inference/b.py": "def f():\n    from otseg.nn import a\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGES", ("otseg",))
    with pytest.raises(
        AssertionError, match="otseg.inference.b -> otseg.nn.a -> otseg.inference.b"
    ):
        test_no_import_circles()
    with pytest.raises(AssertionError, match="otseg.nn.a .layer 2. imports otseg.inference.b"):
        test_library_wings_import_only_downward()
