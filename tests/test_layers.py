"""The package's layers, kept honest: imports run one way, and a worker's `import stated` stays light.

    errors  <-  format  <-  shm  <-  persist  <-  daemon  <-  tools

A module may import its own layer and the layers to its left, never one to its right. The top-level
`stated` package is the worker API (layer shm); `stated.__main__` is a tool.

The tests have a rule of their own: no test module imports another (nor conftest); what two of them
share lives once, in tests/helpers.py.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

PKG = ROOT / "stated"
TESTS = ROOT / "tests"
RANK = {"errors": 0, "format": 1, "shm": 2, "persist": 3, "daemon": 4, "tools": 5}


def _layer(parts: tuple[str, ...]) -> str:
    """Layer of module stated.<parts> (parts without 'stated')."""
    if not parts or parts == ("__init__",):
        return "shm"
    if parts[0] == "__main__":
        return "tools"
    return parts[0]


def _imports(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """(line, stated-relative module parts) of every import of a stated module in `path`."""
    rel = path.relative_to(PKG).with_suffix("").parts
    pkg = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = (*base, *(node.module.split(".") if node.module else ()))
                if node.module is None or mod == base:   # from . import a, b: each name may be a module
                    for alias in node.names:
                        out.append((node.lineno, (*mod, alias.name)))
                    continue
                out.append((node.lineno, mod))
            elif node.module and node.module.split(".")[0] == "stated":
                out.append((node.lineno, tuple(node.module.split(".")[1:])))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stated":
                    out.append((node.lineno, tuple(alias.name.split(".")[1:])))
    return out


def test_imports_run_one_way():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("").parts
        here = _layer(rel)
        for line, target in _imports(path):
            there = _layer(target) if target and target[0] in RANK else "shm" if not target or \
                target[0] in ("__init__", "__version__") else _layer(target)
            if there in RANK and RANK[there] > RANK[here]:
                bad.append(f"stated/{'/'.join(rel)}.py:{line} ({here}) imports stated.{'.'.join(target)} ({there})")
    assert bad == [], "imports against the layers:\n" + "\n".join(bad)


def test_every_layer_says_what_it_owns_and_may_import():
    for layer in RANK:
        if layer == "errors":
            continue
        doc = ast.get_docstring(ast.parse((PKG / layer / "__init__.py").read_text())) or ""
        assert "may import:" in doc.lower() and len(doc) > 200, f"stated/{layer}/__init__.py needs its layer docstring"


@pytest.mark.parametrize("heavy", ["asyncio", "uvloop", "prometheus_client", "asyncpg"])
def test_worker_import_is_light(heavy):
    code = ("import sys, stated; t = stated.attach; "
            f"sys.exit(1 if {heavy!r} in sys.modules else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"`import stated` loaded {heavy}: {res.stderr}"


def test_every_exception_lives_in_errors_and_is_exported():
    import stated
    from stated import errors
    classes = {n for n, o in vars(errors).items() if isinstance(o, type) and issubclass(o, errors.StatedError)}
    assert set(errors.__all__) == classes and set(errors.__all__) <= set(stated.__all__)
    others = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith("Error") or b.id in classes) for b in node.bases):
                others.append(f"{path.relative_to(PKG)}: {node.name}")
    assert others == [], "exceptions belong in stated/errors.py"


# ---- the tests' own rule ------------------------------------------------------------------------------
# What a file under tests/ may import from tests/: helpers.py (the shared helpers) and workers.py (the worker
# program). Not another test module, and not conftest: pytest loads conftest itself (under another import mode
# as a second copy, with its own key bookkeeping), and a helper importable from two places is two helpers.
IMPORTABLE = {"helpers", "workers"}


def _test_imports(path: Path, local: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every import in `path` of a module that lives under tests/ (`local`: their names)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            mods = [base] if base else []
            if base in ("", "tests"):                  # from . import x / from tests import x: x may be a module
                mods += [f"{base}.{a.name}" if base else a.name for a in node.names]
        else:
            continue
        for mod in mods:
            parts = mod.split(".")
            if parts[0] == "tests":
                parts = parts[1:]
            if parts and parts[0] in local:
                out.append((node.lineno, parts[0]))
    return out


def test_no_test_module_imports_another():
    files = sorted(TESTS.rglob("*.py"))
    local = {p.stem for p in files}
    assert {"conftest", "helpers", "workers", "test_layers"} <= local
    bad = [f"tests/{p.relative_to(TESTS)}:{line} imports {mod}" for p in files
           for line, mod in _test_imports(p, local) if mod not in IMPORTABLE or mod == p.stem]
    assert bad == [], "put what test modules share in tests/helpers.py and import it from there:\n" + "\n".join(bad)


def test_the_import_check_sees_every_form(tmp_path):
    src = tmp_path / "test_x.py"
    src.write_text("import test_a\nimport tests.test_b as b\nfrom test_c import f\nfrom conftest import g\n"
                   "from tests import test_d\nfrom . import test_e\nfrom .test_f import h\n"
                   "from helpers import i\nimport workers\nimport os\ndef f():\n    from test_g import j\n")
    local = {"test_a", "test_b", "test_c", "conftest", "test_d", "test_e", "test_f", "test_g", "helpers", "workers"}
    assert [m for _, m in _test_imports(src, local) if m not in IMPORTABLE] == \
        ["test_a", "test_b", "test_c", "conftest", "test_d", "test_e", "test_f", "test_g"]


def test_test_modules_do_not_redefine_a_shared_helper():
    """A module-level function or class of a test module named like one in helpers.py is a second copy."""
    def top_level(path: Path) -> dict[str, int]:
        return {n.name: n.lineno for n in ast.parse(path.read_text()).body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    shared = set(top_level(TESTS / "helpers.py"))
    bad = [f"tests/{p.relative_to(TESTS)}:{line} defines {name} (helpers.{name} exists)"
           for p in sorted(TESTS.rglob("test_*.py")) for name, line in top_level(p).items() if name in shared]
    assert bad == [], "\n".join(bad)
