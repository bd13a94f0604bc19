"""The package imports only downward: kernels <- engine <- judge <- mining/eval <- commands, with the
shared tasks (datasets, prompts, checkers, sandbox) and the base modules (errors, locks, progress) below."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "autojudge"
RANK = {"errors": 0, "data": 0, "judges": 0, "jsonl": 0.5, "progress": 0.5, "testing": 0.5,
        "tasks": 1, "kernels": 1, "engine": 2, "judge": 3, "mining": 4, "eval": 4, "commands": 5}


def imported_layers(path: Path) -> set[str]:
    """The first name under `autojudge.` of every import in the file, at any depth (lazy imports too)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "autojudge" and len(parts) > 1 and parts[1] in RANK:
                layers.add(parts[1])
    return layers


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_has_a_layer():
    modules = [p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.stem not in ("__init__", "__main__")]
    assert {layer_of(p) for p in modules} <= set(RANK), {layer_of(p) for p in modules} - set(RANK)


def test_layers_import_only_downward():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE and path.stem in ("__init__", "__main__"):
            continue  # the package's own entry points re-export the top
        own = layer_of(path)
        for layer in imported_layers(path):
            if layer != own and RANK[layer] >= RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE)} imports autojudge.{layer}")
    assert not upward, upward


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from autojudge.commands.options import engine_options\n")
    assert imported_layers(bad) == {"commands"}
