"""The package's layers, kept honest: imports flow one way (see
ARCHITECTURE.md), no module imports its way back into itself, and imports
inside functions are the exception, each with its reason here."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "runner" / "kvmsplit"

# Lower layers never import higher ones; packages of one rank stay apart.
RANK = {"": 0, "vmm": 1, "kernellog": 1, "tracing": 1, "host": 2, "syscalls": 2, "runs": 3, "report": 4, "kernel": 4,
        "remote": 4, "scenario": 5, "selftests": 5, "series": 5, "cli": 6}

# module -> why its function-level import cannot be at the top (none today;
# `if TYPE_CHECKING:` imports are for annotations only and count as neither)
LATE_IMPORTS: dict[str, str] = {}


def modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), p


def layer(module: str) -> str:
    if module == "kvmsplit.__main__":
        return "cli"        # `python -m kvmsplit` is the command line
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in RANK:
        return ""
    return parts[1]


def imports(module: str, path: Path):
    """(target module, at top level?) for every kvmsplit import."""
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body)
    typing_only = {id(n) for b in tree.body if _is_type_checking(b) for n in ast.walk(b)}
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
            targets = [n for n in names if _is_module(n)] or [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        if id(node) in typing_only:
            continue
        for t in targets:
            if t.split(".")[0] == "kvmsplit":
                yield t, id(node) in top


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").exists() or (PKG / rel / "__init__.py").exists()


ALL = dict(modules())


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_flow_down_the_layers(module):
    src = layer(module)
    for target, _ in imports(module, ALL[module]):
        dst = layer(target)
        assert RANK[dst] < RANK[src] or dst == src, (
            f"{module} (layer {src or 'base'}, rank {RANK[src]}) imports {target} "
            f"(layer {dst or 'base'}, rank {RANK[dst]})")


def test_no_import_cycle():
    graph = {m: {t for t, top in imports(m, p) if top and t in ALL and t != m} for m, p in ALL.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])


def test_function_level_imports_have_a_reason():
    late = {m for m, p in ALL.items() for _, top in imports(m, p) if not top}
    assert late <= set(LATE_IMPORTS), f"imports inside functions without a stated reason: {late - set(LATE_IMPORTS)}"


def test_the_layer_table_names_every_package():
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(RANK) - {""}
