"""The package rules of docs/architecture.md, read from the code's own imports (module-level and in functions).

The table in docs/architecture.md is the rule: each package may import only the packages its row names. The
test parses every module of ``intraq_core/`` and ``pipeline/`` with ``ast``, so an import hidden inside a function
counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*`(?P<pkg>[\w.]+)`\s*\|(?P<what>[^|]*)\|(?P<may>[^|]*)\|\s*(?P<ray>yes|no)\s*\|\s*$")


def package_rules() -> dict[str, tuple[set[str], bool]]:
    """``{package: (packages it may import, may it import the ray library)}`` from the doc's table."""
    rules = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rules[m["pkg"]] = (set(re.findall(r"`([\w.]+)`", m["may"])), m["ray"] == "yes")
    return rules


def project_modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    out = {}
    for top in ("intraq_core", "pipeline"):
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, anywhere in its body (relative imports resolved)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pipeline.ray import metrics`
    return found


def owner(module: str, packages: set[str]) -> str | None:
    """The package of the table that ``module`` belongs to (the longest matching prefix)."""
    best = None
    for pkg in packages:
        if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best)):
            best = pkg
    return best


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports."""
    modules = project_modules()
    return {m: {i for i in imports_of(p, m) if i in modules} for m, p in modules.items()}


def test_every_module_belongs_to_a_package_of_the_table() -> None:
    packages = set(package_rules())
    assert {"intraq_core", "pipeline.stages", "pipeline.ray", "pipeline.cli", "pipeline.errors"} <= packages
    homeless = [m for m in project_modules() if m != "pipeline" and owner(m, packages) is None]
    assert homeless == [], f"modules no row of docs/architecture.md covers: {homeless}"


def test_packages_import_only_what_the_table_allows() -> None:
    rules = package_rules()
    packages = set(rules)
    modules = project_modules()
    broken = []
    for module, path in modules.items():
        pkg = owner(module, packages)
        if pkg is None:
            continue
        allowed, ray_ok = rules[pkg]
        for imported in sorted(imports_of(path, module)):
            if imported == "ray" or imported.startswith("ray."):
                if not ray_ok:
                    broken.append(f"{module} imports {imported} (the ray library)")
                continue
            target = owner(imported, packages) if imported in modules or imported in packages else None
            if target is not None and target != pkg and target not in allowed:
                broken.append(f"{module} imports {imported} ({pkg} may not import {target})")
    assert broken == []


def test_no_import_cycle_between_project_modules() -> None:
    graph = import_graph()
    for m in graph:  # a module importing its own package's __init__ (a docstring only) is no cycle
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_rules_catch_a_forbidden_import(tmp_path: Path) -> None:
    """The parser sees a function-level import: a stage importing an executor would be refused."""
    stage = tmp_path / "stage.py"
    stage.write_text("def f():\n    from pipeline.ray.train import train_ray\n    import ray\n")
    found = imports_of(stage, "pipeline.stages.stage")
    allowed, ray_ok = package_rules()["pipeline.stages"]
    assert "pipeline.ray.train" in found and "ray" in found
    assert owner("pipeline.ray.train", set(package_rules())) not in allowed and not ray_ok


def defined_names(path: Path) -> set[str] | None:
    """Names bound at the top of a module (None when it has ``__getattr__``: any name may exist)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == "__getattr__":
                return None
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.add(sub.id)
    return names


def test_every_project_import_names_a_module_of_this_tree() -> None:
    """An import of an old path (``from pipeline import logs``, ``pipeline.ray_train``) fails here, not later."""
    modules = project_modules()
    stale = []
    for top in ("intraq_core", "pipeline", "tests", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                wanted: list[str] = []
                if isinstance(node, ast.Import):
                    wanted = [a.name for a in node.names if a.name not in modules]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    base = node.module
                    if base not in modules:
                        wanted = [base]
                    else:
                        defined = defined_names(modules[base])
                        wanted = [
                            f"{base}.{a.name}"
                            for a in node.names
                            if f"{base}.{a.name}" not in modules and defined is not None and a.name not in defined
                        ]
                stale += [
                    f"{path.relative_to(REPO)}:{node.lineno} {name}"
                    for name in wanted
                    if name.split(".")[0] in ("pipeline", "intraq_core")
                ]
    assert stale == []
