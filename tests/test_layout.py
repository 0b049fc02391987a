"""The package's shape, read from its source (AST, no imports run): no import cycles, and the paper's
experiments depend on the pipeline, never the other way round (docs/architecture.md)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth in the file (a function's lazy import counts).
    `from pkg import name` is an edge to pkg.name when that is a module, else to pkg."""
    files = {}
    for f in (SRC / "ctxdistill").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: set() for m in files}
    for m, f in files.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in files] or [node.module]
            else:
                continue
            graph[m] |= {t for t in targets if t in files and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "ctxdistill.train" in graph and "ctxdistill.core.loop" in graph["ctxdistill.train"]
    assert cycles(graph) == []


def test_only_experiments_import_experiments():
    graph = import_graph()
    inside = lambda m: m == "ctxdistill.experiments" or m.startswith("ctxdistill.experiments.")  # noqa: E731
    offenders = sorted(f"{m} -> {t}" for m, ts in graph.items() if not inside(m) for t in ts if inside(t))
    assert offenders == []
    assert any(inside(t) for t in graph["ctxdistill.experiments"])  # the walk does see imports of experiments


def test_core_is_below_the_stages():
    """core/ holds what the stages share: it imports no stage, no entry point and no experiment (the config and
    the store's Example type are the data it works on)."""
    graph = import_graph()
    allowed = {"ctxdistill.config", "ctxdistill.store"}
    offenders = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("ctxdistill.core.")
                       for t in ts if not t.startswith("ctxdistill.core") and t not in allowed)
    assert offenders == []


# The pipeline's stages, each with the modules that make it up (on-policy training is the train stage's other
# mode; fidelity is evaluation's, the GGUF writer export's). What they share lies below them: core/, the config,
# the store (the files one stage hands the next), the prompts, the teacher's answers, self-study's passage
# splitter and the report's format. Only the entry points (cli, pipeline, baking, compose, baseline, demo) and
# the paper's experiments chain stages.
STAGES = {"inputs": {"ctxdistill.inputs"}, "teach": {"ctxdistill.teach"},
          "train": {"ctxdistill.train", "ctxdistill.onpolicy"},
          "export": {"ctxdistill.export", "ctxdistill.gguf_export"},
          "evaluate": {"ctxdistill.evaluate", "ctxdistill.fidelity"}}
SHARED = {"ctxdistill.config", "ctxdistill.store", "ctxdistill.prompts", "ctxdistill.answers", "ctxdistill.selfstudy",
          "ctxdistill.report"}


def cross_stage(graph: dict[str, set[str]]) -> list[str]:
    """The imports from one stage's module into another stage's, and from a shared module into any stage's."""
    stage_of = {m: s for s, ms in STAGES.items() for m in ms}
    across = [f"{m} -> {t}" for m, ts in graph.items() if m in stage_of
              for t in ts if t in stage_of and stage_of[t] != stage_of[m]]
    below = [f"{m} -> {t}" for m in SHARED if m in graph for t in graph[m] if t in stage_of]
    return sorted(across + below)


def test_no_stage_imports_another_stage():
    graph = import_graph()
    assert set().union(*STAGES.values()) | SHARED <= set(graph)
    assert "ctxdistill.store" in graph["ctxdistill.train"]  # the walk does see a stage's imports
    assert cross_stage(graph) == []


def test_the_stage_check_finds_a_stage_importing_another():
    graph = import_graph()
    assert cross_stage({**graph, "ctxdistill.train": graph["ctxdistill.train"] | {"ctxdistill.teach"}}) == \
        ["ctxdistill.train -> ctxdistill.teach"]
    assert cross_stage({**graph, "ctxdistill.prompts": {"ctxdistill.inputs"}}) == ["ctxdistill.prompts -> ctxdistill.inputs"]
    assert cross_stage({**graph, "ctxdistill.train": graph["ctxdistill.train"] | {"ctxdistill.onpolicy"}}) == []
