"""The package's shape, checked from its source: each layer imports only from the layers below it
(the README's Layout), and no function is longer than a reader can hold (about 80 lines)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinyslim"

# bottom to top; a module may import from its own layer and the layers below it
LAYERS = [
    ["autograd"],
    ["functional"],
    ["kernels"],
    ["lowrank"],
    ["nn"],
    ["optim", "data"],
    ["adapters"],
    ["io"],
    ["evaluate", "tasks"],
    ["train"],
    ["pretrained", "hf"],
    ["torch"],  # the optional torch engine: the NumPy methods with their layers as torch modules
    ["experiments", "testing"],
    ["cli", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# the one downward call: Tensor's operators (a + b, a @ b, …) run the ops, imported when first called
ALLOWED = {("autograd", "functional")}
MAX_LINES = 80
# still to split or rename (each named, so that no new one slips in): the gradient-check toolkit's two
# long reports
LONG_FOR_NOW = {"tinyslim/testing/adapters.py check_adapter_invariants",
                "tinyslim/testing/torch_check.py assert_module_matches_torch"}
PRIVATE_FOR_NOW: set = set()


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield path, (parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, parts: tuple) -> set[str]:
    """The tinyslim modules a file imports, at the top or inside a function, as dotted paths."""
    package = parts if path.name == "__init__.py" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[:len(package) - node.level + 1])
            if node.module:
                out.add(".".join(base + [node.module]))
            else:
                out.update(".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyslim"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tinyslim"))
    return out


def _layer_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None  # tinyslim.<layer>[.…]; the package itself is no layer


def test_every_module_has_a_layer():
    missing = sorted({parts[1] for _, parts in _modules() if len(parts) > 1} - set(LAYER))
    assert not missing, f"modules {missing} are in no layer; add each to LAYERS here and to the README's Layout"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path, parts in _modules():
        if len(parts) < 2:  # tinyslim/__init__.py: the public entry points, gathered from every layer
            continue
        here = parts[1]
        for target in _imports(path, parts):
            there = _layer_of(target)
            if there in LAYER and LAYER[there] > LAYER[here] and (here, there) not in ALLOWED:
                upward.append(f"{path.relative_to(PACKAGE.parent)} ({here}, layer {LAYER[here]}) imports {target} "
                              f"(layer {LAYER[there]})")
    assert not upward, "imports that reach up a layer:\n  " + "\n  ".join(upward)


def test_no_private_name_is_imported_across_modules():
    private = []
    for path, parts in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tinyslim")):
                where = str(path.relative_to(PACKAGE.parent))
                private += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")
                            and (where, a.name) not in PRIVATE_FOR_NOW
                            and not (node.module is None and a.name == "_lowrank_cpu")]  # the compiled extension
    assert not private, "\n".join(private)


def _functions():
    for path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_reader_can_hold():
    long = sorted((n, f"{path}:{node.lineno} {node.name}") for path, node, n in _functions()
                  if n > MAX_LINES and f"{path} {node.name}" not in LONG_FOR_NOW)
    assert not long, (f"functions over {MAX_LINES} lines (split them into steps a reader can name):\n  "
                      + "\n  ".join(f"{where}: {n} lines" for n, where in long))


@pytest.mark.parametrize("parts, source, expected", [
    (("tinyslim", "cli"), "from .nn import GPT", "tinyslim.nn"),
    (("tinyslim", "cli"), "from . import kernels", "tinyslim.kernels"),
    (("tinyslim", "experiments", "m"), "from ..io import jsonable", "tinyslim.io"),
    (("tinyslim", "experiments", "m"), "from .continual import run_continual", "tinyslim.experiments.continual"),
    (("tinyslim", "tasks"), "def f():\n    from tinyslim.train import pretrain", "tinyslim.train"),
])
def test_the_import_parser_sees_relative_absolute_and_late_imports(tmp_path, parts, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert _imports(path, parts) == {expected}
