"""Packaging as a user meets it: the wheel's metadata (dist name, SPDX license, classifiers, URLs),
LICENSE and py.typed inside it, and the public API type-checked by mypy --strict the way a game
worker's code would be (the wheel installed into a target directory, not this checkout)."""
from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import tomllib
import typing
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from helpers import ROOT, copy_checkout

import stated

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

CLIENT = '''\
import stated
from stated import Handle, StatedError, Table

players: Table = stated.attach("players", owner="zone-3", config="config/stated.toml")
h: Handle = players.alloc(entity=42)
with players.write(h) as p:
    p.name = "alice"
    p.hp -= 10
    p.inventory = [1, 2, 3]
v = players.record(h)
v.x += v.z * 0.05
players.set(h, "gold", 250)
hp: int = players.read(h).hp
found: Handle | None = players.lookup(42)
mine: list[Handle] = players.owned()
players.free(h)
try:
    stated.attach(key=0x53540001, readonly=True)
except StatedError as e:
    print(e)
'''

WRONG = '''\
import stated
players = stated.attach("players", owner=3)
players.alloc(entity="x")
h = players.lookup(1)
h.slot
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of this checkout (the build leaves nothing in the tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = copy_checkout(tmp / "src")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode:
        if "Could not find a version" in res.stderr or "No matching distribution" in res.stderr:
            pytest.skip(f"cannot fetch the build backend: {res.stderr.strip().splitlines()[-1]}")
        raise AssertionError(res.stderr)
    (whl,) = (tmp / "dist").glob("stated_shm-*.whl")
    return whl


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "stated/py.typed" in names and "stated/default.toml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["Name"] == "stated-shm" and meta["Version"] == stated.__version__
    assert meta["License-Expression"] == "MIT"
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Operating System :: POSIX :: Linux" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers), "PEP 639: the SPDX expression only"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Source", "Issues"} <= urls.keys()
    assert "stated = stated.tools.cli:main" in entry
    for layer in ("format", "shm", "persist", "daemon", "tools"):
        assert f"stated/{layer}/__init__.py" in names
    # where users look for the name: the summary, the README section, --help
    assert "import stated" in meta["Summary"]
    assert "**`stated-shm`**" in (ROOT / "README.md").read_text()


def test_runbook_urls_share_the_documentation_url():
    yaml = pytest.importorskip("yaml")
    docs = PYPROJECT["project"]["urls"]["Documentation"]
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "stated-alerts.yml").read_text())
    for r in (r for g in rules["groups"] for r in g["rules"]):
        assert r["annotations"]["runbook_url"].startswith(docs + "/runbook.md#"), r["alert"]


@pytest.mark.parametrize("code, ok", [(CLIENT, True), (WRONG, False)], ids=["readme-client", "wrong-types"])
def test_public_api_type_checks(wheel, tmp_path, code, ok):
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy not installed (pip install '.[test]')")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    (tmp_path / "client.py").write_text(code)
    res = subprocess.run([mypy, "--strict", "--no-incremental", "--python-executable", sys.executable, "client.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
    else:
        out = res.stdout
        assert res.returncode == 1 and "import-untyped" not in out, out
        assert 'Argument "owner" to "attach" has incompatible type "int"' in out
        assert 'Argument "entity" to "alloc" of "Table" has incompatible type "str"' in out
        assert 'Item "None" of "Handle | None" has no attribute "slot"' in out


def test_public_api_is_annotated():
    hints = typing.get_type_hints(stated.attach)
    assert set(inspect.signature(stated.attach).parameters) | {"return"} == set(hints)
    for name, fn in inspect.getmembers(stated.Table, inspect.isfunction):
        if name.startswith("_") and name not in ("__enter__", "__exit__", "__len__"):
            continue
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        missing = [p for p in list(sig.parameters)[1:] if p not in hints and
                   sig.parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        assert not missing and "return" in hints, f"Table.{name}: {missing or 'return'} not annotated"
    assert typing.get_type_hints(stated.Handle) == {"slot": int, "generation": int}
    for name in stated.__all__:
        obj = getattr(stated, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, stated.StatedError), name
