"""The import graph of Fathom's own modules: layers in one direction, no cycles, model/ the network alone.

Every import counts, also one inside a function: a cycle through a function-level import is still
a cycle (it only fails later, on the path that takes it)."""

import ast
import sys

from tests.conftest import ROOT

# lower first: a module may import its own layer and those before it
LAYERS = ("configs", "data", "model", "launch", "monitors", "tools", "bench", "train")
MODEL_MAY_IMPORT = {"torch", "configs", "model"}


def fathom_modules():
    """{dotted name: path} of every module of the project, tests and run outputs aside."""
    out = {"train": ROOT / "train.py"}
    for package in LAYERS[:-1]:
        for path in (ROOT / package).rglob("*.py"):
            if "results" in path.relative_to(ROOT).parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(path):
    """Every module name `path` imports, at any depth; `from a import b` gives a.b and a."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def graph():
    """{module: {Fathom modules it imports}}; a bench script's sibling (imported by its bare name, as
    the scripts put their folder on sys.path) counts as bench.<name>."""
    modules = fathom_modules()
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path):
            sibling = f"{name.rsplit('.', 1)[0]}.{imported}" if "." in name else None
            for candidate in (imported, sibling):
                if candidate in modules and candidate != name:
                    targets.add(candidate)
        edges[name] = targets
    return edges


def layer(module):
    return LAYERS.index(module.split(".")[0])


def test_imports_follow_the_layer_order():
    against = [f"{a} imports {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not against, f"imports against {' -> '.join(LAYERS)}:\n" + "\n".join(sorted(against))


def test_no_module_imports_itself_through_others():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan: a strongly connected component of more than one module is a cycle
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_model_is_the_network_alone():
    """model/ imports torch, configs and itself: no DeepSpeed, TensorBoard, transformers or file formats."""
    offenders = []
    for path in sorted((ROOT / "model").rglob("*.py")):
        for name in imported_names(path):
            top = name.split(".")[0]
            if top not in MODEL_MAY_IMPORT and top not in sys.stdlib_module_names:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)
