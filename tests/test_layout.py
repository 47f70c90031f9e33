"""The package's layout rules (issue 16), checked on the source files with `ast` and in a fresh interpreter.

* no import cycle among neuron_peft's modules, nor among benchmarks/common's (function-local and
  ``TYPE_CHECKING`` imports count: they are how cycles hid before);
* the tuner (`neuron_peft.tuner`) reaches nothing of selection, data, evaluation, integrations, multimodal or cli;
* no function-local import of the package's own modules, except those listed in `PENDING_LOCAL_IMPORTS`;
* every module opens with a docstring, and none is over `MAX_LINES` lines without a reason in `LONG_MODULES`;
* ``import neuron_peft`` in a fresh interpreter registers NEURON_SELECT, installs no global torch hooks and loads
  none of the optional stages (data, evaluation, integrations, multimodal, cli).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "neuron_peft"
ROOT = "neuron_peft"
MAX_LINES = 400

# modules allowed over MAX_LINES, with the reason a reader would accept
LONG_MODULES: dict[str, str] = {}

# function-local imports of the package's own modules still in place, with why
PENDING_LOCAL_IMPORTS: dict[str, str] = {}

# what the tuner (adapt) must never reach: it works on any rows, however they were chosen
ABOVE_TUNER = ("selection", "data", "evaluation", "integrations", "training", "multimodal", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The neuron_peft modules an import statement loads (a ``from pkg import sub`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == ROOT or a.name.startswith(ROOT + ".")]
    if node.level:
        base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module != ROOT and not module.startswith(ROOT + "."):
        return []
    targets = [module]
    targets += [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
    return targets


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(name: str, type_checking: bool = False):
    """(target module, is function-local, line) for every neuron_peft import of `name` (imports under
    ``if TYPE_CHECKING:`` only when `type_checking`)."""
    tree = ast.parse(MODULES[name].read_text())
    skip = set() if type_checking else _type_checking_nodes(tree)
    local = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
            for target in _resolve(name, node):
                yield target, id(node) in local, node.lineno


def _with_packages(name: str, targets, modules) -> set[str]:
    """Each target and the target's packages that `name` is not already inside (Python runs a package's
    ``__init__`` before its submodule), as far as they are in `modules`."""
    out = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and not (name == prefix or name.startswith(prefix + ".")):
                out.add(prefix)
    return out


def _edges(name: str, type_checking: bool = False) -> set[str]:
    """Modules that importing `name` executes first (with `type_checking`, also those it names for type checkers
    only: an import that is a cycle at type-checking time is one refactor away from a real one)."""
    return _with_packages(name, [t for t, _, _ in _imports(name, type_checking)], MODULES)


GRAPH = {name: _edges(name) for name in MODULES}
TYPED_GRAPH = {name: _edges(name, type_checking=True) for name in MODULES}

# benchmarks/common: the shared set-up of the benchmark runners, imported as ``common.<module>``
BENCH_COMMON = PACKAGE.parent / "benchmarks" / "common"


def _bench_graph() -> dict[str, set[str]]:
    """``common.<module>`` -> the ``common`` modules it imports (relative and absolute, TYPE_CHECKING included)."""
    modules = {("common." + p.stem if p.stem != "__init__" else "common"): p for p in sorted(BENCH_COMMON.glob("*.py"))}
    graph = {}
    for name, path in modules.items():
        targets = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.split(".")[0] == "common"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    module = ".".join(["common"] + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != "common":
                    continue
                targets += [module] + [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules]
        graph[name] = _with_packages(name, targets, modules)
    return graph


BENCH_GRAPH = _bench_graph()


def _find_cycle(graph: dict[str, set[str]] = GRAPH) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_the_imports():
    """The checks below are only as good as the graph: known edges must be in it (a resolver bug would pass all)."""
    assert "neuron_peft.tuner.config" in GRAPH["neuron_peft.tuner.model"]
    assert "neuron_peft.errors" in GRAPH["neuron_peft.tuner.routing"]
    assert "neuron_peft.data" in GRAPH["neuron_peft.evaluation"]  # through neuron_peft.data.collate's package
    assert "neuron_peft.tuner" in GRAPH["neuron_peft"]
    assert "neuron_peft" not in GRAPH["neuron_peft.tuner.model"]  # its own ancestor runs first anyway


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
    cycle = _find_cycle(TYPED_GRAPH)
    assert not cycle, "import cycle through TYPE_CHECKING imports: " + " -> ".join(cycle)


def test_no_import_cycle_in_benchmarks_common():
    assert "common.data" in BENCH_GRAPH["common.methods"]  # the graph sees relative imports
    cycle = _find_cycle(BENCH_GRAPH)
    assert not cycle, "import cycle in benchmarks/common: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_circle():
    """A circle of three through a package (what the checks above must catch) is reported."""
    graph = {"a": {"b"}, "b": {"c.d"}, "c.d": {"a"}, "e": set()}
    assert _find_cycle(graph) == ["a", "b", "c.d", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) == []


def test_tuner_reaches_nothing_above_it():
    above = tuple(f"{ROOT}.{name}" for name in ABOVE_TUNER)
    for name in [m for m in MODULES if m == "neuron_peft.tuner" or m.startswith("neuron_peft.tuner.")]:
        bad = sorted(m for m in _reachable(name) if m.startswith(above))
        assert not bad, f"{name} imports (directly or through others) {bad}"


def test_no_function_local_imports_of_own_modules():
    bad = []
    for name in MODULES:
        if name in PENDING_LOCAL_IMPORTS:
            continue
        bad += [f"{name}:{line} imports {target}" for target, local, line in _imports(name) if local]
    assert not bad, bad


def test_every_module_says_what_it_is_for_and_stays_readable():
    for name, path in MODULES.items():
        source = path.read_text()
        doc = ast.get_docstring(ast.parse(source))
        assert doc and len(doc.split()) >= 5, f"{path.relative_to(PACKAGE.parent)} has no opening paragraph"
        lines = source.count("\n")
        assert lines <= MAX_LINES or name in LONG_MODULES, f"{name}: {lines} lines (over {MAX_LINES}, no reason given)"


def test_allow_lists_name_real_modules():
    """An entry for a module that is gone (or no longer needs it) would silently widen the rules."""
    for name in [*LONG_MODULES, *PENDING_LOCAL_IMPORTS]:
        assert name in MODULES, name
    for name in LONG_MODULES:
        assert MODULES[name].read_text().count("\n") > MAX_LINES, f"{name} is short now: drop it from LONG_MODULES"
    for name in PENDING_LOCAL_IMPORTS:
        assert any(local for _, local, _ in _imports(name)), f"{name}: drop it from PENDING_LOCAL_IMPORTS"


FRESH = r"""
import json, sys
import torch
optim, module = sys.modules["torch.optim.optimizer"], sys.modules["torch.nn.modules.module"]
hooks = lambda: {
    name: len(getattr(owner, name))
    for owner, names in (
        (optim, ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")),
        (module, ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                  "_global_backward_pre_hooks", "_global_parameter_registration_hooks",
                  "_global_module_registration_hooks", "_global_buffer_registration_hooks")),
    )
    for name in names
}
before = hooks()
import inspect
import peft

LIBS = ("peft", "transformers", "safetensors", "huggingface_hub", "accelerate", "torch")


def functions():
    # id of every function / method / property of the libraries' loaded modules and their classes: a patched
    # (replaced) one gets a new id
    out = {}
    for mname, mod in list(sys.modules.items()):
        if not mname.startswith(LIBS) or mod is None:
            continue
        for k, v in list(vars(mod).items()):
            if inspect.isclass(v) and getattr(v, "__module__", None) == mname:
                for ck, cv in list(vars(v).items()):
                    if callable(cv) or isinstance(cv, (staticmethod, classmethod, property)):
                        out[f"{mname}.{k}.{ck}"] = id(cv)
            elif callable(v):
                out[f"{mname}.{k}"] = id(v)
    return out


functions_before = functions()
registered_before = "NEURON_SELECT" in peft.utils.PeftType.__members__
import neuron_peft
functions_after = functions()
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
print(json.dumps({
    "registered_before": registered_before,
    "peft_type": str(peft.utils.PeftType("NEURON_SELECT").value),
    "config": PEFT_TYPE_TO_CONFIG_MAPPING["NEURON_SELECT"].__name__,
    "tuner": PEFT_TYPE_TO_TUNER_MAPPING["NEURON_SELECT"].__name__,
    "hooks_before": before,
    "hooks_after": hooks(),
    "loaded": sorted(m for m in sys.modules if m.startswith("neuron_peft")),
    "checked_functions": len(functions_before),
    "replaced": sorted(k for k, v in functions_before.items() if k in functions_after and functions_after[k] != v),
}))
"""


def test_import_registers_the_method_and_nothing_global():
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, check=True, timeout=300)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert not facts["registered_before"]
    assert (facts["peft_type"], facts["config"], facts["tuner"]) == (
        "NEURON_SELECT",
        "NeuronSelectConfig",
        "NeuronSelectModel",
    )
    assert facts["hooks_after"] == facts["hooks_before"], "import neuron_peft installed a global torch hook"
    # no function, method or property of peft / transformers / torch / ... was replaced (before: three PEFT wrappers)
    assert facts["checked_functions"] > 10_000 and facts["replaced"] == [], facts["replaced"]
    optional = tuple(f"{ROOT}.{m}" for m in ("data", "evaluation", "integrations", "training", "multimodal", "cli"))
    assert not [m for m in facts["loaded"] if m.startswith(optional)], facts["loaded"]
