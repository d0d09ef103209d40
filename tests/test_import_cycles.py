"""The package's shape: its modules import each other without cycles, lazy imports inside
functions included, so each can be read and changed knowing only what it imports; and only
``store/`` talks to the database."""

import ast
import os
import re

import dtool_cache_manager

PACKAGE_DIR = os.path.dirname(dtool_cache_manager.__file__)
PACKAGE = "dtool_cache_manager"


def _modules():
    found = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path[:-3], os.path.dirname(PACKAGE_DIR))
                dotted = dotted.replace(os.sep, ".")
                found[dotted[:-len(".__init__")] if dotted.endswith(".__init__")
                      else dotted] = path
    return found


def _imports(module, path, modules):
    """The package's modules that ``module`` imports anywhere in its source.  ``from . import
    x`` counts as importing ``x``, not the package's ``__init__``."""
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names
                          if f"{target}.{a.name}" in modules]
            found.update(submodules or ([target] if target in modules else []))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return found - {module}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return trail[trail.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, trail + [dep])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_import_cycles_lazy_imports_included():
    modules = _modules()
    graph = {m: _imports(m, path, modules) for m, path in modules.items()}
    assert f"{PACKAGE}.hooks.host" in graph[f"{PACKAGE}.hooks.tracking"]  # the graph sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


DRIVERS = {"sqlite3", "psycopg", "psycopg2"}
SQL = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|"
                 r"DELETE\s+FROM|CREATE\s+(TABLE|INDEX|TRIGGER)|PRAGMA\s+\w+)", re.S)


def test_only_the_store_imports_a_database_driver_holds_sql_or_uses_a_connection():
    """``store/`` owns the database: a second implementation (PostgreSQL) plugs in there.
    No connection leaves it: callers use the ledger's methods and ``Ledger.index``."""
    outside = []
    for module, path in _modules().items():
        if module == f"{PACKAGE}.store" or module.startswith(f"{PACKAGE}.store."):
            continue
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            outside += [f"{module} imports {n}" for n in names if n.split(".")[0] in DRIVERS]
            if isinstance(node, ast.Attribute) and node.attr == "conn":
                outside.append(f"{module}:{node.lineno} reaches for a connection")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and SQL.search(node.value):
                outside.append(f"{module}:{node.lineno} holds SQL")
    assert outside == []
    assert SQL.search("SELECT relpath FROM items") and SQL.search("INSERT OR IGNORE INTO x")
