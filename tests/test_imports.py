"""The package's structure: imports run in one direction, never in a circle, and the pure modules
stay cheap to import."""

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "dpo_dist"
# Lower layers never import higher ones: training -> reference -> distributed -> model -> data -> leaves.
# The run setup sits above what it builds; the entry points (CLI, commands, demo, report) on top.
LAYERS = {
    "dpo_dist.errors": 0,
    "dpo_dist.config": 1, "dpo_dist.fingerprint": 1, "dpo_dist.collectives": 1, "dpo_dist.tiny": 1,
    "dpo_dist.host_memory": 1, "dpo_dist.ownership": 1, "dpo_dist.run_lock": 1,
    "dpo_dist.precision": 2,
    "dpo_dist.data": 3,
    "dpo_dist.model": 4,
    "dpo_dist.fsdp2": 4,  # the FSDP2 engine, which distributed.py chooses
    "dpo_dist.distributed": 5,
    "dpo_dist.reference": 6,
    "dpo_dist.session": 7,
    "dpo_dist.training": 8,
    "dpo_dist.commands": 9, "dpo_dist.report": 9, "dpo_dist.demo": 9, "dpo_dist.cli": 9, "dpo_dist.__main__": 9,
}
ENTRY_POINTS = 9  # these may import each other (no circle, see below)


def module_names() -> dict[str, object]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(module: str, path, known: set[str]) -> set[str]:
    """dpo_dist modules that `module` imports, at module level or inside functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    # A submodule's import runs its package's __init__ first: that edge is not a dependency.
    return {name for name in found & known if name != module and not module.startswith(name + ".")}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {module: imports_of(module, path, set(names)) for module, path in names.items()}


def layer(module: str) -> tuple[int, str]:
    if module == "dpo_dist":  # the package's own __init__: imports nothing
        return 0, module
    group = max((g for g in LAYERS if module == g or module.startswith(g + ".")), key=len, default=None)
    assert group is not None, f"{module} belongs to no layer of this test: add it to LAYERS"
    return LAYERS[group], group


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle met in a depth-first walk, as the path that closes it."""
    state, circles = {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_import_circle():
    circles = find_circles(import_graph())
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_circle_finder_finds_circles():
    """The test above can fail: circles of two and three modules are found."""
    assert find_circles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_circles({"a": {"b"}, "b": set()}) == []


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        (rank, group) = layer(module)
        for target in targets:
            target_rank, target_group = layer(target)
            if target_rank > rank or (target_rank == rank and target_group != group and rank != ENTRY_POINTS):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))


def test_pure_modules_import_cheaply():
    code = ("import sys, dpo_dist.config, dpo_dist.training.losses; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'accelerate', 'transformers', 'peft'}))")
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert heavy.strip() == "[]"
