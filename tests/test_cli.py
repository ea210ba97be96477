"""The command line as an operator types it: global options anywhere, check-config, get, completion in
a real bash, and `stated top` driven in a real terminal (tmux)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import ROOT, STATED, fork_child, wait_child

import stated
from stated.shm import segment


def run(*args, env=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([*STATED, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def players(make_segment, write_config):
    """A players table with three records (entities 41..43) owned by zone-1, and its config."""
    key = make_segment(capacity=50)
    t = stated.Table(segment.open(key), name="players", owner="zone-1")
    for e in (41, 42, 43):
        h = t.alloc(entity=e)
        with t.write(h) as p:
            p.name = f"player-{e}"
            p.hp = e
            p.inventory = [e, 1]
    cfg = write_config(tables={"players": {"key": key, "capacity": 50}})
    yield t, cfg
    t.close()


# ------------------------------------------------------------------------------ global options

def test_global_options_before_or_after_the_command(players):
    _, cfg = players
    for args in (["--config", cfg, "status", "--json"], ["status", "--json", "--config", cfg],
                 ["-v", "status", "--config", cfg, "--json"], ["status", "--json", "-v", "--config", cfg]):
        res = run(*args)
        assert res.returncode == 0, (args, res.stderr)
        assert json.loads(res.stdout)["config"] == str(cfg), args


def test_version_names_the_distribution():
    res = run("--version")
    assert res.returncode == 0
    assert res.stdout.startswith(f"stated {stated.__version__} (stated-shm,")


# ------------------------------------------------------------------------------- check-config

def test_check_config_like_promtool(tmp_path, write_config):
    good = write_config()
    bad = tmp_path / "bad.toml"
    bad.write_text('[tables.players]\ncapacity = 10\nfields = ["hp: i33"]\n')
    res = run("check-config", good)
    assert res.returncode == 0 and "SUCCESS: 1 tables" in res.stdout, res.stdout
    res = run("check-config", good, bad)
    assert res.returncode == 1
    assert f"Checking {bad}\n  FAILED: {bad}: table 'players': field 'fields.hp'" in res.stdout, res.stdout
    res = run("--config", good, "check-config")        # no FILE: the --config one
    assert res.returncode == 0 and f"Checking {good}" in res.stdout


def test_check_config_warns_about_paths_the_service_cannot_write(tmp_path):
    etc = tmp_path / "etc" / "stated"
    etc.mkdir(parents=True)
    (etc / "stated.toml").write_text('[daemon]\nstate_dir = "/etc/stated/var"\ncontrol_socket = "/etc/stated/s.sock"\n'
                                     '[tables.players]\ncapacity = 10\nfields = ["hp: i32"]\n')
    res = run("check-config", etc / "stated.toml")
    assert res.returncode == 0
    assert "WARNING: state_dir = /etc/stated/var is read-only" in res.stdout
    assert "WARNING: control_socket = /etc/stated/s.sock is read-only" in res.stdout
    shipped = run("check-config", ROOT / "config" / "stated.toml")
    assert shipped.returncode == 0 and "WARNING" not in shipped.stdout, shipped.stdout


# ------------------------------------------------------------------------------------- get

def test_get_prints_a_record_as_json(players):
    t, cfg = players
    res = run("get", "players", "42", "--config", cfg)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    h = t.lookup(42)
    assert out["slot"] == h.slot and out["generation"] == h.generation
    assert out["owner"] == "zone-1" and out["entity"] == 42
    assert out["record"]["name"] == "player-42" and out["record"]["hp"] == 42
    assert out["record"]["inventory"][:2] == [42, 1]
    assert run("get", "players", "0x2b", "--config", cfg, "--compact").stdout.count("\n") == 1   # 43
    miss = run("get", "players", "7", "--config", cfg)
    assert miss.returncode == 1 and "no record for entity 7" in miss.stderr
    nope = run("get", "monsters", "7", "--config", cfg)
    assert nope.returncode == 1 and "no table named 'monsters'" in nope.stderr


def test_get_attaches_read_only(players):
    """As uid nobody with only read permission on the segment, the record still comes out:
    `stated get` attaches SHM_RDONLY and takes no lock."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to uid nobody")
    t, cfg = players
    shared = Path(tempfile.mkdtemp(prefix="stated-get-", dir="/tmp"))       # readable by nobody
    try:
        os.chmod(shared, 0o755)
        conf = shared / "stated.toml"
        conf.write_text(cfg.read_text().replace('"var"', f'"{shared}/var"'))
        os.chmod(conf, 0o644)
        shm = t._seg.shm
        old = shm.mode, shm.gid
        shm.gid = pwd.getpwnam("nobody").pw_gid           # nobody reads through the group, cannot write
        shm.mode = 0o640
        out_r, out_w = os.pipe()

        def get() -> int:                                 # the child, as nobody: the CLI in-process
            os.close(out_r)
            sys.stdout = os.fdopen(out_w, "w")               # pytest's capture replaced the real one
            sys.stderr = sys.stdout
            from stated.tools import cli
            code = cli.main(["get", "players", "41", "--config", str(conf), "--compact"])
            sys.stdout.flush()
            return code
        pid = fork_child(get, as_nobody=True)
        os.close(out_w)
        with os.fdopen(out_r) as f:
            out = f.read()
        code = wait_child(pid)
        shm.mode, shm.gid = old
    finally:
        shutil.rmtree(shared)
    assert code == 0, out
    assert json.loads(out)["record"]["hp"] == 41


# ------------------------------------------------------------------------------- completion

def _complete(script: Path, line: str) -> list[str]:
    words = line.split(" ")
    code = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\nCOMP_CWORD={len(words) - 1}\n"
            "_stated\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return [w for w in res.stdout.splitlines() if w]


def test_bash_completion(tmp_path):
    if not shutil.which("bash"):
        pytest.skip("bash not installed")
    script = tmp_path / "stated.bash"
    res = run("completion", "bash")
    assert res.returncode == 0
    script.write_text(res.stdout)
    assert _complete(script, "stated che") == ["check-config"]
    assert set(_complete(script, "stated st")) == {"status", "store"}
    assert _complete(script, "stated run --mi") == ["--migrate"]
    assert _complete(script, "stated --config x.toml sta") == ["status"]
    assert "--config" in _complete(script, "stated snapshot --")
    assert _complete(script, "stated completion f") == ["fish"]
    (tmp_path / "my.toml").write_text("")
    assert _complete(script, f"stated status --config {tmp_path}/my") == [f"{tmp_path}/my.toml"]


def test_zsh_and_fish_completion_scripts():
    zsh = run("completion", "zsh").stdout
    assert zsh.startswith("#compdef stated") and "bashcompinit" in zsh
    fish = run("completion", "fish").stdout
    assert "complete -c stated -n __fish_use_subcommand -a check-config" in fish
    if shutil.which("fish"):
        res = subprocess.run(["fish", "--no-config", "-c", fish + "\ncomplete -C 'stated che'"],
                             capture_output=True, text=True, timeout=30)
        assert res.stdout.startswith("check-config"), res.stdout + res.stderr


# -------------------------------------------------------------------------------------- top

class Tmux:
    """A private tmux server (its own socket) running one command in an 80x24 terminal."""

    def __init__(self, tmp_path: Path, command: list[str]):
        self.exe = shutil.which("tmux")
        self.sock = str(tmp_path / "tmux.sock")
        self.cmd(["new-session", "-d", "-x", "80", "-y", "24", "-s", "top", " ".join(command)])
        self.cmd(["resize-window", "-t", "top", "-x", "80", "-y", "24"])
        self.server_pid = int(self.cmd(["display-message", "-p", "-t", "top", "#{pid}"]).strip())
        self.pane_pid = int(self.cmd(["display-message", "-p", "-t", "top", "#{pane_pid}"]).strip())

    def cmd(self, args: list[str]) -> str:
        res = subprocess.run([self.exe, "-S", self.sock, *args], capture_output=True, text=True, timeout=10)
        if res.returncode:
            raise RuntimeError(res.stderr)
        return res.stdout

    def screen(self) -> str:
        return self.cmd(["capture-pane", "-p", "-t", "top"])

    def wait_for(self, predicate, timeout=10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen()
            if predicate(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never matched:\n{s}")
            time.sleep(0.2)

    def pane_alive(self) -> bool:
        try:
            os.kill(self.pane_pid, 0)
            return Path(f"/proc/{self.pane_pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            return False

    def close(self) -> None:
        for pid in (self.pane_pid, self.server_pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _row(screen: str, table: str) -> list[str]:
    for line in screen.splitlines():
        cells = line.split()
        if cells and cells[0] == table:
            return cells
    return []


def test_top_in_a_terminal(players, tmp_path):
    if not shutil.which("tmux"):
        pytest.skip("tmux not installed (Debian package 'tmux'; .ci/system-deps installs it)")
    t, cfg = players
    cmd = [f"PYTHONPATH={ROOT}", sys.executable, "-m", "stated", "top", "--config", str(cfg), "--interval", "0.5"]
    term = Tmux(tmp_path, ["env", *cmd])
    try:
        s = term.wait_for(lambda s: "stated top" in s and _row(s, "players"))
        header = next(line for line in s.splitlines() if "TABLE" in line).split()
        assert header[:4] == ["TABLE", "USED", "CAPACITY", "FILL"], s
        assert "REPAIRS" in header and "DIRTY" in header, s
        row = dict(zip(header, _row(s, "players")))
        assert row["USED"] == "3" and row["CAPACITY"] == "50" and row["FILL"] == "6.0%"
        assert row["OWNERS"] == "1/0" and row["DIRTY"] == "3"
        # allocations while it runs: the view follows, and shows a rate
        hs = [t.alloc(entity=100 + i) for i in range(20)]
        s = term.wait_for(lambda s: dict(zip(header, _row(s, "players"))).get("USED") == "23")
        row = dict(zip(header, _row(s, "players")))
        assert row["FILL"] == "46.0%" and int(row["ALLOC/s"]) > 0, s
        for h in hs:
            t.free(h)
        term.wait_for(lambda s: dict(zip(header, _row(s, "players"))).get("USED") == "3")
        term.cmd(["send-keys", "-t", "top", "q"])
        deadline = time.monotonic() + 5
        while term.pane_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not term.pane_alive(), "q did not quit"
    finally:
        term.close()


def test_top_once_prints_plain_text(players):
    _, cfg = players
    res = run("top", "--once", "--config", cfg)
    assert res.returncode == 0, res.stderr
    assert _row(res.stdout, "players")[1:3] == ["3", "50"]
