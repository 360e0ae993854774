"""The package's floors: every import runs down (or sideways within a floor), never up, never in a cycle;
and the processes that need no model (ingress, router, the app builder) never load torch.

Imports are read from the source (every ``import`` / ``from`` statement, function-level ones too), so a
lazy upward import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cluster"

# Bottom to top; a module belongs to the floor of its longest matching prefix. The step contracts are
# a leaf both sides import; the engine's core (scheduler, block manager) sits below its frontend.
FLOORS: list[tuple[str, ...]] = [
    ("cluster.errors", "cluster.request_limits", "cluster.sampling_params", "cluster.structured_outputs", "cluster.config",
     "cluster.contracts", "cluster.v1", "cluster.kernels", "cluster.swiftkv.checkpoint"),
    ("cluster.distributed",),
    ("cluster.model.layers",),
    ("cluster.model",),
    ("cluster.sampling",),
    ("cluster.runner",),
    ("cluster.parallel",),
    ("cluster.engine.sequence", "cluster.engine.block_manager", "cluster.engine.scheduler",
     "cluster.engine.fault_isolation", "cluster.engine.stop_checker", "cluster.engine.plan", "cluster.engine.core",
     "cluster.engine.core_process", "cluster.spec"),
    ("cluster.engine", "cluster.outputs", "cluster.llm"),
    ("cluster.serving",),
    ("cluster.cli", "cluster.bench", "cluster.bench_chat", "cluster.bench_micro", "cluster.bench_serve", "cluster.gpu_check",
     "cluster.bench_vllm", "cluster.bench_vllm_runner", "cluster.bench_openmp",
     "cluster.bench_tp", "cluster.bench_spec", "cluster.soak", "cluster.swiftkv"),
]
# The package's own __init__ is the public facade (it re-exports LLM lazily), not a floor.
FACADES = {"cluster"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    best, floor = -1, None
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), index
    if floor is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS")
    return floor


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from cluster.x import y`` counts y when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [m for m in submodules if m in modules]
            if len(names) < len(submodules):  # some names are attributes of node.module itself
                names.append(node.module)
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.startswith("cluster"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        # A package's __init__ is reached by importing any module below it: not an edge of its own.
        graph[name] = {m for m in imports_of(path, modules) if m != name and not name.startswith(m + ".")}
    return graph


def test_every_module_is_on_a_floor_and_imports_only_down():
    graph = import_graph()
    upward = []
    for module, deps in sorted(graph.items()):
        if module in FACADES:
            continue
        for dep in sorted(deps):
            if dep in FACADES:
                upward.append(f"{module} imports the facade {dep} (import the defining module)")
            elif floor_of(dep) > floor_of(module):
                upward.append(f"{module} (floor {floor_of(module)}) -> {dep} (floor {floor_of(dep)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {m: d for m, d in import_graph().items() if m not in FACADES}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The two tests above can fail: the same functions flag a planted upward edge and cycle."""
    assert floor_of("cluster.model.layers.linear") < floor_of("cluster.distributed.tp_group") + 2
    assert floor_of("cluster.engine.scheduler") < floor_of("cluster.engine.llm_engine")
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from cluster.serving.ingress import Ingress\n")
    assert imports_of(planted, {"cluster.serving.ingress", "cluster.serving"}) == {"cluster.serving.ingress"}
    with pytest.raises(AssertionError):
        floor_of("cluster.nowhere_at_all")


TORCH_FREE = ["cluster", "cluster.config", "cluster.sampling_params", "cluster.engine.scheduler",
              "cluster.serving.prompt_tokenizer", "cluster.engine.input_processor",
              "cluster.engine.block_manager", "cluster.serving.router", "cluster.serving.ingress",
              "cluster.serving.app", "cluster.serving.conversion", "cluster.spec.proposer"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_in_a_fresh_interpreter_with_torch_blocked(module):
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {module}\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_torch_block_bites():
    """The same script on a module that needs torch fails, so the test above can fail."""
    script = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'torch' or name.startswith('torch.'):\n            raise ImportError(name)\n"
              "sys.meta_path.insert(0, Block())\nimport cluster.runner.model_runner\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "ImportError" in result.stderr
