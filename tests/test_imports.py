"""The package's import structure: no import cycles, no hidden (function-local) imports.

Both tests read the source with `ast` and import nothing, so they see every import statement —
top-level, inside functions, under `if`/`try` — whether or not a test happens to execute it.

* Cycles. A cycle between two modules means neither can be understood (or imported) without the
  other; the shared piece belongs in a lower module both import. The graph has an edge from a
  module to every project module it imports, wherever the statement sits. `from pkg import name`
  points at `pkg.name` when that is a module, else at `pkg`; importing `a.b.c` also runs the
  `__init__` of `a.b`, so an edge to `a.b.c` brings edges to its enclosing packages (those that do
  not enclose the importing module itself, which are already running when it runs).
* Function-local imports. An import inside a function hides a dependency from the reader and from
  this graph's top-level view; it is allowed only to keep an optional dependency from loading
  until it is used (`LAZY_ALLOWED`).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "qwen3repro"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# What a function may import lazily, by where the function lives ("" = anywhere in the package): the
# top-level name of a third-party package, or a project module. Each entry says why it must not load
# with the importing module.
LAZY_ALLOWED: dict[str, set[str]] = {
    # The full-scale engine (the `full` extra, absent from a tiny-scale install), and plotting, which
    # only report writers need.
    "": {"nanotron", "matplotlib"},
    # nanotron's YAML configs and Hugging Face checkpoints (`full` extras), in nanotron code only; and
    # the project modules that import nanotron when they load (checked by
    # test_lazily_imported_project_modules_load_an_optional_dependency).
    f"{PACKAGE}.nanotron": {"yaml", "transformers", f"{PACKAGE}.nanotron.model", f"{PACKAGE}.nanotron.optimizer"},
    # flash-attn is built for GPUs only; the nanotron model falls back to PyTorch attention without it.
    f"{PACKAGE}.nanotron.model": {"flash_attn"},
    # `Tokenizer.load` of a hub id (full scale) goes through transformers (the `full` extra); the tiny
    # scale reads its own tokenizer.json with `tokenizers`.
    f"{PACKAGE}.tokenizer": {"transformers"},
    # lm-eval's IFEval checks and NLTK (~2.5 s of imports: scipy, scikit-learn) for the instruction-following
    # reward only; NLTK's data path must be set before NLTK loads.
    f"{PACKAGE}.rewards.ifeval": {"lm_eval", "nltk", "punkt", "langdetect"},
    # vLLM generates the teacher outputs at full scale when it is installed (a GPU-only engine, in no extra).
    f"{PACKAGE}.stages.teacher_outputs": {"vllm"},
    # Evaluating any Hugging Face checkpoint (`eval-hf`): the transformers and vLLM backends load their engine
    # when chosen, and a hub id is fetched through huggingface_hub; the tiny evaluations use neither.
    f"{PACKAGE}.evals.backends": {"transformers", "vllm"},
    f"{PACKAGE}.evals.hf_checkpoint": {"transformers", "huggingface_hub"},
    # verl lives in its own environment (`make verl-env`); the tool adapters subclass its BaseTool there only.
    f"{PACKAGE}.verl.tools": {"verl"},
}


@dataclass(frozen=True)
class Import:
    """One import statement's reference to a top-level name, or to a project module."""

    module: str      # the importing module
    target: str      # a project module (the longest prefix of the name that is one), or a top-level name
    line: int
    local: bool      # inside a function body

    @property
    def where(self) -> str:
        return f"{self.module}:{self.line}"


def _module_names() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_names()


def _in_function(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function (at any depth)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def _project_module(name: str) -> str:
    """The longest prefix of a dotted project name that is a module (`pkg.mod.attr` -> `pkg.mod`)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> list[Import]:
    """Every import in `module`: project imports resolved to modules, others to their top-level name."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    local = _in_function(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base == PACKAGE or base.startswith(PACKAGE + "."):
                # `from pkg import sub` imports the module pkg.sub; `from pkg import name` needs pkg itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            else:
                targets = [base]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                target = _project_module(target)
            else:
                target = target.partition(".")[0]
            found.append(Import(module, target, node.lineno, id(node) in local))
    return found


def _enclosing(module: str) -> list[str]:
    """The packages enclosing `module`, outermost first (`a.b.c` -> `a`, `a.b`)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, dict[str, Import]]:
    """module -> {imported project module: the first statement that imports it}."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in MODULES}
    for module in MODULES:
        running = set(_enclosing(module)) | {module}
        for imp in imports_of(module):
            if imp.target not in MODULES:
                continue
            for target in [*_enclosing(imp.target), imp.target]:
                if target == imp.target or target not in running:
                    if target != module:
                        graph[module].setdefault(target, imp)
    return graph


def strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(graph: dict[str, dict[str, Import]], start: str, members: set[str]) -> list[Import]:
    """The shortest cycle through `start` inside one component, as its import statements."""
    previous: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w, imp in sorted(graph[v].items()):
                if w not in members or w in previous:
                    continue
                previous[w] = imp
                if w == start:
                    cycle = [imp]
                    while cycle[-1].module != start:
                        cycle.append(previous[cycle[-1].module])
                    return cycle[::-1]
                following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def test_module_walk_sees_the_package():
    # Guards the tests below against passing vacuously (a wrong path finds no modules, a wrong
    # resolution no edges): one import of each form, resolved.
    assert f"{PACKAGE}.cli" in MODULES and f"{PACKAGE}.models.qwen3" in MODULES
    graph = import_graph()
    assert f"{PACKAGE}.config" in graph[f"{PACKAGE}.models.qwen3"]              # from ..config import X
    assert f"{PACKAGE}.models.hf" in graph[f"{PACKAGE}.models.qwen3"]           # from . import hf
    assert f"{PACKAGE}.rewards.code" in graph[f"{PACKAGE}.rewards"]             # from . import code (package)
    assert f"{PACKAGE}.rewards" in graph[f"{PACKAGE}.coldstart.filters"]        # from ..rewards import name
    assert f"{PACKAGE}.coldstart" in graph[f"{PACKAGE}.evals.posttrain"]        # enclosing package of a target
    local = {(i.target, i.local) for i in imports_of(f"{PACKAGE}.nanotron.launch")}
    assert (f"{PACKAGE}.nanotron.model", True) in local and ("nanotron", True) in local


def test_cycle_finder_on_a_known_graph():
    def imp(a, b):
        return Import(a, b, 1, False)

    edges = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["f"], "f": ["e"], "g": ["a"]}
    graph = {v: {w: imp(v, w) for w in ws} for v, ws in edges.items()}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e", "f"]]
    assert [i.target for i in shortest_cycle(graph, "a", {"a", "b", "c"})] == ["b", "c", "a"]


def test_no_import_cycles():
    graph = import_graph()
    problems = []
    for component in strongly_connected(graph):
        cycle = shortest_cycle(graph, component[0], set(component))
        path = " -> ".join([cycle[0].module] + [f"{imp.target} ({imp.where})" for imp in cycle])
        problems.append(f"cycle among {', '.join(component)}:\n    {path}")
    assert not problems, "import cycles:\n  " + "\n  ".join(problems)


def _lazy_allowed(imp: Import) -> bool:
    return any(imp.module == scope or imp.module.startswith(scope + ".") or not scope
               for scope, names in LAZY_ALLOWED.items() if imp.target in names)


def test_lazily_imported_project_modules_load_an_optional_dependency():
    # A project module may be imported lazily only because importing it loads an optional dependency.
    optional = set().union(*(names for names in LAZY_ALLOWED.values())) - set(MODULES)
    for module in set().union(*LAZY_ALLOWED.values()) & set(MODULES):
        loads = {imp.target for imp in imports_of(module) if not imp.local}
        assert loads & optional, f"{module} is allowed to be imported lazily but loads no optional dependency"


def test_function_local_imports_only_for_optional_dependencies():
    problems = []
    for module in MODULES:
        for imp in sorted(set(imports_of(module)), key=lambda i: (i.line, i.target)):
            if imp.local and not _lazy_allowed(imp):
                problems.append(f"{imp.where} imports {imp.target} inside a function")
    assert not problems, ("function-local imports (move them to the top of the module; a cycle that "
                          "forces one means a shared piece belongs in a lower module):\n  " + "\n  ".join(problems))
