"""The package layers of prism_megatron: imports point down only, no package cycle, no stage
imports another stage.

Every module is parsed with ``ast`` and every import is counted, top-level and function-local
alike (a function-local import that reaches up a layer is the same dependency, only hidden). A
package may import itself, the package root, and packages on LOWER layers; packages on the same
layer are independent of each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = "prism_megatron"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / ROOT

# Bottom to top. Each row is a layer; a package may import only from rows above it in this list.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    # Pure math and text rules, no config: the response format (system prompt, tags, regex,
    # writer) is here, and config.py takes the system prompt's default from it.
    ("rewards", "algorithms"),
    ("config", "distributed"),
    ("metrics", "checkpoint", "optim", "schedule"),   # schedule: megatron's forward(-only) pass
    ("data",),
    # The weights vocabulary (rules, tables, TP/PP layout, checkpoint files, loading): below models,
    # so a model family's mapping table lives beside the model.
    ("weights",),
    ("models",),
    ("convert",),        # the conversions: build models as templates, verify against them
    ("rollout",),
    ("trainer", "preflight", "plan"),
    ("eval",),           # held-out evaluation, run by the stages during training as well
    ("runtime",),
    ("rl", "discriminator"),   # the RL / discriminator components the stages are built from
    ("stages",),
    ("pipeline", "testing"),
    ("cli", "demo"),
    ("study",),          # the mechanism study: runs on top of the demo's miniature
]

# Modules allowed to break the rules while they move between layers: none (keep it that way).
PENDING: set[str] = set()


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, base: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import of ``ROOT`` modules in ``path``, at any depth."""
    name = module_name(path, base)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:   # `from pkg import module` depends on pkg.module
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return sorted({(t, line) for t, line in found if t == ROOT or t.startswith(ROOT + ".")})


def import_graph(base: Path) -> dict[str, list[tuple[str, int]]]:
    files = sorted(base.rglob("*.py"))
    known = {module_name(p, base) for p in files}
    return {module_name(p, base): imports_of(p, base, known) for p in files}


def package_of(module: str) -> str | None:
    """``prism_megatron.data.rows`` -> ``data``; the root package -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def unit_of(module: str, graph: dict) -> str:
    """The package a cycle is looked for between: two levels (``models.qwen3_vl``) where the
    module sits in a subpackage, else one (``data``, ``config``)."""
    parts = module.split(".")
    if len(parts) > 2 and ".".join(parts[:3]) in graph and any(
            m.startswith(".".join(parts[:3]) + ".") for m in graph):
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else ""


def violations(graph: dict[str, list[tuple[str, int]]], layers=LAYERS,
               pending=frozenset()) -> list[str]:
    rank = {pkg: i for i, row in enumerate(layers) for pkg in row}
    problems = []
    for src in sorted({package_of(m) for m in graph} - {None} - set(rank)):
        problems.append(f"package {src!r} is in no layer (add it to LAYERS)")
    for module, targets in sorted(graph.items()):
        if module in pending:
            continue
        src = package_of(module)
        if src is None or src not in rank:
            continue
        for target, line in targets:
            dst = package_of(target)
            if dst is None or dst == src:
                if src == "stages" == dst and target.startswith(ROOT + ".stages.") \
                        and module != ROOT + ".stages" and target.split(".")[2] != module.split(".")[2]:
                    problems.append(f"{module}:{line} imports {target}: a stage imports another "
                                    f"stage (move the shared code below stages)")
                continue
            if dst not in rank:
                problems.append(f"{module}:{line} imports {target}: package {dst!r} is in no layer")
            elif rank[dst] >= rank[src]:
                where = "the same layer as" if rank[dst] == rank[src] else "a higher layer than"
                problems.append(f"{module}:{line} imports {target}: {dst!r} is on {where} {src!r}")
    return problems


def package_cycles(graph: dict[str, list[tuple[str, int]]], pending=frozenset()) -> list[list[str]]:
    """Cycles between packages (``models.qwen3_vl`` and ``models.discriminator`` count apart)."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module in pending or package_of(module) is None:
            continue
        src = unit_of(module, graph)
        for target, _ in targets:
            if package_of(target) is None:
                continue
            dst = unit_of(target, graph)
            if dst != src and not src.startswith(dst + ".") and not dst.startswith(src + "."):
                edges.setdefault(src, set()).add(dst)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_imports_point_down_the_layers():
    problems = violations(import_graph(PACKAGE_DIR), pending=PENDING)
    assert problems == [], "\n".join(problems)


def test_no_package_cycle():
    cycles = package_cycles(import_graph(PACKAGE_DIR), pending=PENDING)
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_pending_modules_exist():
    """A stale allow-list entry would silently allow a future module of that name."""
    graph = import_graph(PACKAGE_DIR)
    assert sorted(m for m in PENDING if m not in graph) == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    base = tmp_path / ROOT
    for rel, text in {"__init__.py": "", **files}.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(base).parents:
            (base / parent / "__init__.py").touch()
        path.write_text(text)
    return base


def test_planted_violations_are_found(tmp_path):
    base = _plant(tmp_path, {
        "errors.py": "",
        "data/rows.py": "def f():\n    from prism_megatron.rollout.base import X\n",   # local import
        "rollout/base.py": "from ..data import rows\n",                                   # relative
        "stages/sft.py": "import prism_megatron.stages.rlvr\n",
        "stages/rlvr.py": "from prism_megatron import errors\n",
        "config.py": "from prism_megatron import distributed\n",                          # same layer
        "distributed.py": "",
        "mystery/x.py": "",
    })
    graph = import_graph(base)
    assert ("prism_megatron.data.rows", 2) not in graph["prism_megatron.rollout.base"]
    assert graph["prism_megatron.rollout.base"] == [("prism_megatron.data.rows", 1)]
    assert violations(graph) == [
        "package 'mystery' is in no layer (add it to LAYERS)",
        "prism_megatron.config:1 imports prism_megatron.distributed: 'distributed' is on the same "
        "layer as 'config'",
        "prism_megatron.data.rows:2 imports prism_megatron.rollout.base: 'rollout' is on a higher "
        "layer than 'data'",
        "prism_megatron.stages.sft:1 imports prism_megatron.stages.rlvr: a stage imports another "
        "stage (move the shared code below stages)",
    ]
    assert violations(graph, pending={"prism_megatron.data.rows", "prism_megatron.config",
                                      "prism_megatron.stages.sft"}) == [
        "package 'mystery' is in no layer (add it to LAYERS)"]
    assert package_cycles(graph) == [["data", "rollout", "data"]]
    assert package_cycles(graph, pending={"prism_megatron.data.rows"}) == []


def test_planted_subpackage_cycle_is_found(tmp_path):
    base = _plant(tmp_path, {
        "models/qwen3_vl/model.py": "from prism_megatron.models.discriminator import model\n",
        "models/discriminator/model.py": "def f():\n    import prism_megatron.models.qwen3_vl.model\n",
    })
    assert package_cycles(import_graph(base)) == [
        ["models.discriminator", "models.qwen3_vl", "models.discriminator"]]


def test_layer_table_names_each_package_once():
    names = [p for row in LAYERS for p in row]
    assert sorted(p for p in set(names) if names.count(p) > 1) == []
