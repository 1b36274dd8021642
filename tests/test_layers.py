"""The package's shape: layers that import one way and no import cycle (read with `ast`, imports under
`if TYPE_CHECKING:` aside), and every relative link of README.md and docs/ resolving.

Layers, bottom up (a module imports only from its own layer or below):
  foundation (paths, collectives, SLURM, Hydra glue, checkpoint files, Lightning internals),
  backbones, heads, data, evaluation, training, tools; train.py and eval.py sit above them all.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "facerec"
FOUNDATION = {"paths", "distributed", "cluster", "config", "checkpoint_files", "lightning_compat"}
LAYERS = ["foundation", "backbones", "heads", "data", "evaluation", "training", "tools"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    top = module.split(".")[1]
    return LAYERS.index("foundation" if top in FOUNDATION else top)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded.update(id(child) for statement in node.body for child in ast.walk(statement))
    return guarded


def imports(module: str) -> set[str]:
    """The facerec modules `module` imports at run time (a name imported from a package counts as
    the submodule where there is one, else the package)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    guarded = _type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                found.add(target)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_belongs_to_a_layer():
    assert {module.split(".")[1] for module in MODULES} <= FOUNDATION | set(LAYERS[1:])


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{module} ({LAYERS[layer(module)]}) imports {target} ({LAYERS[layer(target)]})"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    """Depth-first search for a back edge; the cycle it closes is reported."""
    state: dict[str, str] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module], _ = "open", stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target)
        state[module], _ = "done", stack.pop()

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_the_imports_it_is_about():
    # the graph is read, not assumed: a few edges every version of the package has
    assert "facerec.heads.loss" in GRAPH["facerec.heads.head"]
    assert "facerec.data.ijb" in GRAPH["facerec.evaluation.protocols.templates"]
    assert "facerec.evaluation" in GRAPH["facerec.training.module"]


# ------------------------------------------------------------------------------ documentation links
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    targets = [first or second for first, second in LINK.findall(text)]
    return [target for target in targets if not re.match(r"^[a-z]+:|^#|^mailto:", target)]


@pytest.mark.parametrize("document", DOCS, ids=[str(d.relative_to(REPO_ROOT)) for d in DOCS])
def test_relative_links_resolve(document):
    broken = [
        target for target in relative_links(document) if not (document.parent / target.split("#")[0]).exists()
    ]
    assert not broken, f"{document.relative_to(REPO_ROOT)}: {broken}"


def test_the_readme_stays_short():
    assert len((REPO_ROOT / "README.md").read_bytes()) <= 10_000
