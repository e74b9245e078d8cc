"""The package's layers: imports point down and never form a circle.

Order (a package may import only packages of a lower rank, or itself)::

    errors < io < config < sparsemil       0  shared helpers (leaves, in this order)
    mil, data, prune, curvature            1  (never import each other)
    limit                                  2
    train                                  3
    wsi                                    4
    experiments                            5
    cli                                    6

Every import counts, including those inside functions. The two documented re-export modules
``sparsemil.prune.hvp`` and ``sparsemil.prune.limit`` (old import paths kept for users) are
exempt from the direction rule, and checked to hold nothing but imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsemil"
RANK = {
    "errors": 0.0, "io": 0.1, "config": 0.2, "sparsemil": 0.3,
    "mil": 1, "data": 1, "prune": 1, "curvature": 1,
    "limit": 2, "train": 3, "wsi": 4, "experiments": 5, "cli": 6,
}  # fmt: skip
COMPAT_REEXPORTS = {"sparsemil.prune.hvp", "sparsemil.prune.limit"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``sparsemil...`` module this file imports (absolute or relative, any depth)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "sparsemil":
                out.add(target)
                # ``from sparsemil.pkg import module`` imports that submodule too
                for alias in node.names:
                    if (SRC.parent / Path(*target.split("."), f"{alias.name}.py")).is_file():
                        out.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "sparsemil")
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sparsemil"


def test_every_top_level_module_has_a_rank() -> None:
    layers = {_layer(m) for m in _graph()}
    assert layers <= set(RANK), f"modules without a layer: {sorted(layers - set(RANK))}"


def test_imports_point_down() -> None:
    bad = []
    for module, deps in _graph().items():
        if module in COMPAT_REEXPORTS:
            continue
        src = _layer(module)
        for dep in deps:
            dst = _layer(dep)
            if dst == src:
                continue
            if RANK[dst] >= RANK[src]:
                bad.append(f"{module} -> {dep}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    graph = _graph()
    modules = set(graph)
    edges = {m: {d for d in deps if d in modules and d != m} for m, deps in graph.items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(COMPAT_REEXPORTS))
def test_compat_modules_only_reexport(module: str) -> None:
    path = SRC.parent / Path(*module.split(".")).with_suffix(".py")
    body = ast.parse(path.read_text()).body
    for node in body:
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        assert is_doc or isinstance(node, ast.ImportFrom), f"{module}: {ast.dump(node)[:80]}"


def test_documented_import_paths() -> None:
    """The README's import paths keep working after the re-layering."""
    from sparsemil.limit.predict import predict_limit
    from sparsemil.mil import MMILTransformer
    from sparsemil.mil.official import load_official_checkpoint
    from sparsemil.prune.hvp import HessianOperator
    from sparsemil.prune.limit import predict_limit as compat_predict_limit
    from sparsemil.prune.sweep import pruning_sweep

    assert compat_predict_limit is predict_limit
    assert callable(pruning_sweep) and callable(load_official_checkpoint)
    assert MMILTransformer.__name__ == "MMILTransformer"
    assert HessianOperator.__module__ == "sparsemil.curvature.hvp"


def test_no_process_wide_state_in_library_code() -> None:
    """Seeding, thread counts and the plotting backend are set at the entry points only
    (a seed scoped by ``torch.random.fork_rng`` on the line before is restored, so allowed)."""
    banned = (
        "torch.manual_seed(", "np.random.seed(", "random.seed(", "torch.set_num_threads(",
        "matplotlib.use(", "os.environ.setdefault(", "os.putenv(",
    )  # fmt: skip
    bad = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("cli/"):
            continue
        lines = path.read_text().splitlines()
        for lineno, line in enumerate(lines, 1):
            code = line.split("#", 1)[0]
            if lineno > 1 and "fork_rng(" in lines[lineno - 2]:
                continue  # seeding scoped by torch.random.fork_rng is restored on exit
            writes_env = re.search(r"os\.environ\[[^]]*\]\s*=[^=]", code)
            if any(b in code for b in banned) or writes_env:
                bad.append(f"{rel}:{lineno}: {line.strip()}")
    assert not bad, "process-wide state in library code:\n" + "\n".join(bad)
