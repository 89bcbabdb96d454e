"""The package's layers (docs/architecture.md): every import of the project points to its own layer or below,
and the import graph has no cycle. Every import counts: top level, inside functions, under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_lightning"

# module (or package, covering its submodules) -> layer; docs/architecture.md draws the same table
LAYERS = {
    "rlhf_lightning": 0, "losses": 0, "kl_control": 0, "options": 0, "optim": 0, "padding": 0, "files": 0,
    "hf_files": 0, "tokenizer": 0, "tasks": 0, "distributed": 0, "option_groups": 0,
    "models": 1,
    "generation": 2, "evaluation": 2, "completions": 2, "sampling": 2, "scoring": 2, "rewards": 2, "policy": 2, "lora": 2, "checkpoints": 2, "export": 2, "sharding": 2,
    "data": 3, "rl": 3,
    "modules": 4, "callbacks": 4, "strategy": 4,
    "cli": 5, "pipeline": 5, "evaluate": 5, "__main__": 5,
}
NAMES = {0: "L0 pure", 1: "L1 models", 2: "L2 engines", 3: "L3 data", 4: "L4 modules", 5: "L5 commands"}
DYNAMIC_IMPORT_ALLOWED = {"rlhf_lightning.cli"}  # its table of subcommands


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    short = module.split(".")
    key = short[1] if len(short) > 1 else short[0]
    if key not in LAYERS:
        raise KeyError(f"{module} has no layer: add it to LAYERS here and to docs/architecture.md")
    return LAYERS[key]


def project_imports(path: Path, modules: set[str], name: str | None = None) -> list[tuple[int, str]]:
    """(line, imported project module) for every import statement anywhere in the file of module `name`."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "rlhf_lightning"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "rlhf_lightning":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.append((node.lineno, f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target))
    return found


def dynamic_imports(path: Path) -> list[int]:
    """Lines that import by name at run time (`importlib.import_module`, `__import__`)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "import_module") or (isinstance(f, ast.Name) and f.id in ("__import__", "import_module")):
                lines.append(node.lineno)
    return lines


def graph() -> tuple[dict[str, list[tuple[int, str]]], dict[str, Path]]:
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {m: project_imports(p, set(files)) for m, p in files.items()}, files


def test_every_module_has_a_layer_and_imports_only_its_own_layer_or_below():
    edges, files = graph()
    upward = []
    for module, imports in edges.items():
        for line, target in imports:
            if layer_of(target) > layer_of(module):
                upward.append(f"{files[module].relative_to(PACKAGE.parent)}:{line}: {module} ({NAMES[layer_of(module)]}) imports {target} ({NAMES[layer_of(target)]})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_module_imports_the_top_level_package_or_imports_by_name():
    edges, files = graph()
    through_top = [f"{m}:{line}" for m, imports in edges.items() for line, target in imports if target == "rlhf_lightning" and m != "rlhf_lightning"]
    assert not through_top, f"`from rlhf_lightning import ...` (import the module itself): {through_top}"
    dynamic = [f"{m}:{line}" for m, p in files.items() if m not in DYNAMIC_IMPORT_ALLOWED for line in dynamic_imports(p)]
    assert not dynamic, f"imports by name at run time: {dynamic}"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    edges, _ = graph()
    assert cycles({m: {t for _, t in imports if t != m} for m, imports in edges.items()}) == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    source = tmp_path / "mod.py"
    source.write_text("import importlib\n\ndef f():\n    from rlhf_lightning.cli import main\n    return importlib.import_module('x')\n")
    assert project_imports(source, {"rlhf_lightning.cli"}, "rlhf_lightning.mod") == [(4, "rlhf_lightning.cli")]
    assert dynamic_imports(source) == [5]
    assert layer_of("rlhf_lightning.cli") == 5 > layer_of("rlhf_lightning.models.gpt") == 1
    with pytest.raises(KeyError, match="has no layer"):
        layer_of("rlhf_lightning.somewhere_new")


def test_architecture_doc_lists_every_layer_entry():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [name for name in LAYERS if name not in ("rlhf_lightning", "__main__") and f"`{name}" not in doc]
    assert not missing, f"docs/architecture.md does not name: {missing}"
