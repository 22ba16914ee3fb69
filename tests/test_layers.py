"""The import graph of bigtrain and data_pipeline: no cycle, and no import against the layer order
(README, "Layout"). Imports are read from the source (module level and inside functions; the
``if TYPE_CHECKING:`` blocks, which never run, are left out), so a lazy import cannot hide an
upward dependency; nor can a family hook named as ``lazy("package.module:attribute")``."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# Lowest first; a module may import its own layer and those below. Each entry is a module or a
# package (covering its submodules). Keep README "Layout" in step.
LAYERS: list[list[str]] = [
    ["data_pipeline"],
    ["bigtrain", "bigtrain.config", "bigtrain.optional", "bigtrain.faults", "bigtrain.exits"],
    ["bigtrain.distributed", "bigtrain.models", "bigtrain.outputs", "bigtrain.metrics", "bigtrain.resilience"],
    ["bigtrain.optim", "bigtrain.checkpoint", "bigtrain.components", "bigtrain.diffusion", "bigtrain.tasks"],
    ["bigtrain.eval"],
    ["bigtrain.trainer"],
    ["bigtrain.families"],
    ["bigtrain.recipes"],
    ["bigtrain.memory", "bigtrain.export"],
    ["bigtrain.run"],
    ["bigtrain.sample", "bigtrain.distill_logits", "bigtrain.encode_latents", "bigtrain.report", "bigtrain.tools",
     "bigtrain.bench"],
    ["bigtrain.cli", "bigtrain.__main__"],
]
# imports forbidden whatever the layers say (docs/extending.md, README "Layout")
FORBIDDEN = [("data_pipeline", "bigtrain"), ("bigtrain.models", "bigtrain.distributed")]


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _is_lazy_ref(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
    arg = node.args[0]
    return func == "lazy" and isinstance(arg, ast.Constant) and isinstance(arg.value, str)


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif _is_lazy_ref(node):  # lazy("package.module:attribute"): imported on first call
            targets = [node.args[0].value.partition(":")[0]]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name`: the module or its package
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path, packages: tuple[str, ...] = ("bigtrain", "data_pipeline")) -> dict[str, set[str]]:
    known = _modules(root, packages)
    return {name: _imports(name, path, known) for name, path in known.items()}


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    best, depth = None, -1  # the most specific entry wins (bigtrain.config over bigtrain)
    for i, group in enumerate(layers):
        for prefix in group:
            if _covers(prefix, module) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def violations(edges: dict[str, set[str]], layers: list[list[str]] = LAYERS,
               forbidden: list[tuple[str, str]] = FORBIDDEN) -> list[str]:
    out = [f"cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    for a in sorted(edges):
        la = layer_of(a, layers)
        if la is None:
            out.append(f"{a} is in no layer (add it to LAYERS and README 'Layout')")
            continue
        for b in sorted(edges[a]):
            lb = layer_of(b, layers)
            if lb is not None and lb > la:
                out.append(f"upward import: {a} (layer {la}) imports {b} (layer {lb})")
            out += [f"forbidden import: {a} imports {b}" for x, y in forbidden if _covers(x, a) and _covers(y, b)]
    return out


def test_bigtrain_imports_form_layers_without_cycles() -> None:
    problems = violations(graph(ROOT))
    assert not problems, "\n".join(problems)


def test_the_checker_finds_a_cycle_an_upward_import_and_a_forbidden_one(tmp_path: Path) -> None:
    """The rule itself, on a made-up tree: low imports high lazily (upward and a cycle), models
    import distributed (same layer, but forbidden); a TYPE_CHECKING import is ignored."""
    for rel, text in {
        "bigtrain/__init__.py": "",
        "bigtrain/config/__init__.py": "def f():\n    from bigtrain.cli import main\n",
        "bigtrain/cli.py": "from bigtrain.config import f\n",
        "bigtrain/optional.py": "from bigtrain.config import lazy\nhook = lazy('bigtrain.cli:main')\n",
        "bigtrain/models/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import bigtrain.cli\n"
                                       "from bigtrain.distributed import x\n",
        "bigtrain/distributed/__init__.py": "x = 1\n",
        "data_pipeline/__init__.py": "",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = violations(graph(tmp_path))
    assert "cycle: bigtrain.cli <-> bigtrain.config" in problems
    assert any(p.startswith("upward import: bigtrain.config (layer 1) imports bigtrain.cli") for p in problems)
    assert "upward import: bigtrain.optional (layer 1) imports bigtrain.cli (layer 11)" in problems  # lazy hook
    assert "forbidden import: bigtrain.models imports bigtrain.distributed" in problems
    assert not any("models" in p and "cli" in p for p in problems)  # TYPE_CHECKING: never runs
