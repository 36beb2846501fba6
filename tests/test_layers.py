"""The package layout is the architecture (docs/ARCHITECTURE.md): imports flow one way.

Layers, top to bottom; a module may import from its own package and from any
package in a lower layer, never from a higher one or from another package of its
own layer (the fronts never import each other):

    entry   uspawn.__main__, then uspawn.cli (the `uspawn` command's dispatcher)
    fronts  uspawn.machine | uspawn.oci | uspawn.diag
    engine  uspawn.engine
    net     uspawn.net (address/port leases are state leases)
    rooms   uspawn.state | uspawn.tree
    kernel  uspawn.kernel
    base    uspawn.base

Every import counts: module level, inside functions, under TYPE_CHECKING. Names
starting with `_` are not imported across packages, and there is no import cycle
between modules (lazy imports included).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"machine", "oci", "diag"},
    {"engine"},
    {"net"},
    {"state", "tree"},
    {"kernel"},
    {"base"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def path_of(module: str) -> Path:
    return SRC.joinpath(*module.split("."))


def is_module(module: str) -> bool:
    return path_of(module).with_suffix(".py").exists() or path_of(module).is_dir()


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            out.append((node.lineno, mod, names))
            # `from pkg import module` imports the module too
            out.extend((node.lineno, f"{mod}.{n}", []) for n in names
                       if is_module(f"{mod}.{n}"))
    return out


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "uspawn":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def all_modules() -> list[Path]:
    return sorted((SRC / "uspawn").rglob("*.py"))


def violations() -> list[str]:
    found = []
    for path in all_modules():
        me = module_name(path)
        mine = package_of(me)
        for line, mod, names in imports_of(path):
            theirs = package_of(mod)
            if theirs is None or theirs == "__init__" or theirs == mine:
                continue
            where = f"{path.relative_to(SRC)}:{line}: {me} imports {mod}"
            if mine not in RANK or theirs not in RANK:
                found.append(f"{where} (package not in a layer)")
            elif RANK[theirs] < RANK[mine]:
                found.append(f"{where} (upward: {theirs} is above {mine})")
            elif RANK[theirs] == RANK[mine]:
                found.append(f"{where} (sideways: {mine} and {theirs} are peers)")
            private = [n for n in names if n.startswith("_")]
            if private:
                found.append(f"{where} (private names across packages: {private})")
    return found


def private_uses() -> list[str]:
    """`module._name` where module was imported from another package."""
    found = []
    for path in all_modules():
        me = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if is_module(f"{node.module}.{a.name}"):
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                mod = aliases[node.value.id]
                if package_of(mod) != package_of(me):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {me} uses "
                                 f"{mod}.{node.attr}")
    return found


def cycles() -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    known = {module_name(p) for p in all_modules()}
    for path in all_modules():
        me = module_name(path)
        deps = {mod for _, mod, _ in imports_of(path) if mod in known and mod != me}
        # importing a package runs its __init__: count the module, not the package
        graph[me] = {d for d in deps if not path_of(d).is_dir()}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_every_package_is_in_a_layer() -> None:
    pkgs = {p.name for p in (SRC / "uspawn").iterdir()
            if p.is_dir() and (p / "__init__.py").exists()}
    pkgs |= {p.stem for p in (SRC / "uspawn").glob("*.py") if p.stem != "__init__"}
    assert pkgs <= set(RANK), f"not in a layer: {sorted(pkgs - set(RANK))}"


def test_imports_flow_one_way() -> None:
    assert violations() == []


def test_no_private_names_across_packages() -> None:
    assert private_uses() == []


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_the_check_sees_function_level_imports(tmp_path: Path) -> None:
    """The checker itself: an upward import inside a function is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f() -> None:\n    from uspawn.engine import runtime\n")
    assert [(2, "uspawn.engine", ["runtime"]), (2, "uspawn.engine.runtime", [])] == \
        imports_of_in(probe, "uspawn.kernel.probe")


def imports_of_in(path: Path, as_module: str) -> list[tuple[int, str, list[str]]]:
    """imports_of for a file outside src (the checker's own test)."""
    tree = ast.parse(path.read_text())
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
            out.extend((node.lineno, f"{node.module}.{a.name}", []) for a in node.names
                       if is_module(f"{node.module}.{a.name}"))
    assert package_of(as_module) == "kernel" and RANK["engine"] < RANK["kernel"]
    return out
