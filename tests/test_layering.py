"""The package's floors: a module imports only from its own floor or below (function-local imports count).

    0 config, ops            kernels and their references, the config
    1 layers, cache          the two mixers, the caches
    2 modeling, sala         the model (``import sala`` registers it with the Auto classes)
    3 data, testing          corpora, packing, retrieval documents; test helpers
    4 engine, demo           loading, generation, decoding, serving
    5 eval                   tasks, perplexity, speed, reports
    6 convert                teacher loading, weight transfer, HALO scoring
    7 train                  recipes, the trainer, HALO's alignment
    8 pipeline, convert.profile   orchestration of convert + train + eval
    9 *.cli                  the commands; sala.cli collects them
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sala"
FLOORS = {"config": 0, "ops": 0, "layers": 1, "cache": 1, "modeling": 2, "": 2, "data": 3, "testing": 3,
          "engine": 4, "demo": 4, "eval": 5, "convert": 6, "train": 7, "pipeline": 8, "convert.profile": 8}


def floor(module: str) -> int:
    """Floor of a dotted module name inside sala ('' = the package root)."""
    if module == "cli" or module.endswith(".cli") or module == "__main__":
        return 9
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in FLOORS:
            return FLOORS[key]
    return FLOORS[""] if module in ("", "__init__") else FLOORS[parts[0]]


def sala_imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, dotted target inside sala) of every import in the file, relative ones resolved."""
    rel = path.relative_to(root).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif node.module and (node.module == "sala" or node.module.startswith("sala.")):
                names = [node.module[len("sala."):] if node.module != "sala" else ""]
            else:
                continue
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("sala."):] if a.name != "sala" else "") for a in node.names
                    if a.name == "sala" or a.name.startswith("sala.")]
    return out


def upward_imports(root: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        me = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if me in ("", "__main__"):
            continue  # the package root registers the model; __main__ runs the CLI
        for line, target in sala_imports(path, root):
            if floor(target) > floor(me):
                bad.append(f"{path.relative_to(root)}:{line} ({me}, floor {floor(me)}) imports {target or 'sala'} "
                           f"(floor {floor(target)})")
    return bad


def test_no_module_imports_from_a_higher_floor():
    bad = upward_imports()
    assert not bad, "imports from a higher floor:\n" + "\n".join(bad)


def test_the_checker_sees_upward_imports(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "service.py").write_text(
        "import torch\nfrom .generation import x\n\ndef f():\n    from ..eval.runner import y\n    import sala.train\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "runner.py").write_text("from ..engine.loading import load_model\nfrom .. import modeling\n")
    bad = upward_imports(tmp_path)
    assert [b.split(" imports ")[1].split(" ")[0] for b in bad] == ["eval.runner", "train"]
    assert floor("convert.profile") == 8 and floor("convert.transfer") == 6 and floor("engine.cli") == 9
