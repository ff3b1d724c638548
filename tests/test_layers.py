"""The packages import downward only: kernels -> qlora -> the model packages (llama, falcon, which builds
on llama) -> the scripts (train.py, infer.py), bench/ and tests/. Every module's imports are read with ast (function-level imports too), so a
lazy import that runs up a layer or closes a cycle fails here as well as one at the top."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower layers may not import higher ones; modules of one layer may import each other (no cycles).
LAYERS = {"kernels": 0, "qlora": 1, "llama": 2, "falcon": 2, "train": 3, "infer": 3, "bench": 3, "tests": 3, "conftest": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    files = [*ROOT.glob("*.py"), *(p for d in ("kernels", "qlora", "llama", "falcon", "bench", "tests") for p in (ROOT / d).glob("*.py"))]
    return {module_name(p): p for p in files}


def imports_of(path: Path, modules: dict) -> set[str]:
    """The modules of ours that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from qlora import lora` imports the module qlora.lora; `from qlora.nf4 import x` qlora.nf4
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "conftest":                # tests import it by that name (from conftest import ...)
                name = "tests.conftest"
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def layer_of(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    assert all(name.split(".")[0] in LAYERS for name in our_modules()), sorted(our_modules())


def test_imports_run_downward_only():
    upward = [f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
              for src, targets in sorted(graph().items()) for dst in sorted(targets) if layer_of(dst) > layer_of(src)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges, cycles = graph(), []
    state = {}                                    # module -> "open" while on the stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    # A guard on the test itself: a lazy upward import inside a function is found.
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from llama.model import Llama\n    import qlora.nf4\n")
    assert imports_of(path, our_modules()) == {"llama.model", "qlora.nf4"}
