"""The modules a saved folder ships (``sentinel_lightning/standalone/``) import only the standard library, torch,
transformers and each other: a folder loads with ``trust_remote_code`` where sentinel-lightning is not installed."""

import ast
import sys
from pathlib import Path

from sentinel_lightning import saving, standalone

FOLDER = Path(standalone.__file__).parent
MODULES = sorted(path for path in FOLDER.glob("*.py") if path.name != "__init__.py")
ALLOWED = {"torch", "transformers", *sys.stdlib_module_names}


def imports(path: Path) -> list[tuple[int, str]]:
    """``(level, module)`` of every import statement in ``path``: level 0 absolute, 1 relative to its folder."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_the_standalone_modules_import_only_torch_transformers_and_each_other():
    siblings = {path.stem for path in MODULES}
    assert {"families", "pruned_modeling"} <= siblings
    for path in MODULES:
        for level, module in imports(path):
            if level == 0:
                assert module.split(".")[0] in ALLOWED, f"{path.name} imports {module}"
            else:
                assert level == 1 and module in siblings, f"{path.name} imports {'.' * level}{module}"


def test_a_folder_saved_with_modeling_code_ships_every_standalone_module(tmp_path):
    from conftest import tiny_model

    from sentinel_lightning import attach_gates, compact, save_pruned

    model = tiny_model("llama")
    attach_gates(model).prune([(1, 0)])  # unequal groups: the folder needs its own modeling code
    save_pruned(compact(model), str(tmp_path))
    assert all((tmp_path / path.name).read_text() == path.read_text() for path in MODULES)
    entry = (tmp_path / f"{saving.MODELING_MODULE}.py").read_text()
    relative = {node.module for node in ast.walk(ast.parse(entry)) if isinstance(node, ast.ImportFrom) and node.level}
    assert relative and relative <= {path.stem for path in MODULES}
