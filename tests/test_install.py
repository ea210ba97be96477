"""README's "Installing as a service", run verbatim in a scratch root.

The lines run as root in private namespaces: mount (overlays over /etc, /usr, /opt and /var, whose
writes land in tmp_path; a fresh /run), IPC (the segments and the kernel.shm* sysctls stay inside)
and PID (everything dies with the test). Only the `systemctl` lines cannot run without systemd as
PID 1; in their place the test starts ExecStart= the way the unit would: as User=/Group=, with
UMask=, NOTIFY_SOCKET, and /etc, /usr, /opt, /var and /run read-only except StateDirectory= and
RuntimeDirectory= (what ProtectSystem=strict leaves writable). Then a worker user in group `stated`
attaches and writes, `stated status` and `stated snapshot` go through the control socket, and
SIGTERM stops the daemon with exit 0.

This caught the first README's three mistakes: a config the `stated` user could not read, a
control socket under read-only /etc, and `pip install` into Debian's externally managed Python.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, UNIT, copy_checkout, unit_settings

README = ROOT / "README.md"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NEEDED = ("unshare", "setpriv", "useradd", "systemd-sysusers", "systemd-tmpfiles", "sysctl", "apt-get", "ip")


def install_lines(text: str) -> list[str]:
    """The shell lines of the first ```sh block of "## Installing as a service"."""
    section = text.split("## Installing as a service", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no ```sh block in the install section"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def unit(key: str) -> str:
    values = unit_settings(UNIT).get(key)
    assert values, key
    return values[-1]


def test_readme_and_deploy_doc_agree():
    """Every install line of the README appears in docs/deploy.md (comments aside)."""
    doc = DEPLOY_DOC.read_text()
    for line in install_lines(README.read_text()):
        cmd = line.split("  #", 1)[0].strip()
        assert cmd in doc, f"docs/deploy.md lacks: {cmd}"


def test_readme_lines_are_what_the_test_runs():
    lines = install_lines(README.read_text())
    assert [ln for ln in lines if ln.startswith("systemctl")] == \
        ["systemctl daemon-reload && systemctl enable --now stated"]
    assert not any(ln.startswith(("sudo ", "pip ")) for ln in lines), "root shell, no sudo; pip only in the venv"
    assert unit("ExecStart").split()[0] == "/usr/local/bin/stated"


def _script(scratch: Path, lines: list[str]) -> str:
    steps = "\n".join(f"echo '+ {ln}' | sed 's/  #.*//'\n{ln}" if not ln.startswith("systemctl") else
                      f"echo '(skipped, no systemd as PID 1: {ln})'" for ln in lines)
    user, group, umask = unit("User"), unit("Group"), unit("UMask")
    exec_start = unit("ExecStart")
    return f"""set -euo pipefail
S={shlex.quote(str(scratch))}
for d in etc usr opt var; do
  mkdir -p "$S/ov/$d/up" "$S/ov/$d/wk"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$S/ov/$d/up,workdir=$S/ov/$d/wk" "/$d"
done
mount -t tmpfs -o mode=755 tmpfs /run
cd "$S/src"
export PATH={DEBIAN_PATH} HOME=/root PIP_CACHE_DIR="$S/pip-cache" PIP_DISABLE_PIP_VERSION_CHECK=1
unset VIRTUAL_ENV PYTHONPATH

# ---- README, verbatim ----
{steps}

# ---- what the unit does instead of `systemctl enable --now stated` ----
id {user}
test "$(stat -c '%U:%G %a' /etc/stated/stated.toml)" = "root:stated 640"
test "$(stat -c '%U:%G %a' /var/lib/stated)" = "stated:stated 750"
test "$(stat -c '%U:%G %a' /run/stated)" = "stated:stated 750"
useradd --system --no-create-home --shell /usr/sbin/nologin --groups stated gameworker
# ProtectSystem=strict: read-only, except StateDirectory= and RuntimeDirectory=
mount --bind /var/lib/stated /var/lib/stated
mount --bind /run/stated /run/stated
for d in /etc /usr /opt /var /run; do mount -o remount,bind,ro "$d"; done
# its own network namespace: 127.0.0.1:9474 may be taken on this machine (the control socket is a
# path, reachable from here); unshare and sh exec, so $! is the daemon's pid
unshare --net -- sh -c 'ip link set lo up && umask {umask} && exec setpriv --reuid={user} --regid={group} \\
  --init-groups -- {exec_start}' 2> "$S/daemon.log" &
DAEMON=$!
for i in $(seq 1 100); do [ -S /run/stated/stated.sock ] && break; sleep 0.1; done
test -S /run/stated/stated.sock || {{ cat "$S/daemon.log"; exit 1; }}
stated status | tee "$S/status.txt"
grep -q '^daemon: pid' "$S/status.txt"
setpriv --reuid=gameworker --regid=gameworker --init-groups -- /opt/stated/bin/python -c '
import stated
t = stated.attach("players", owner="zone-1", config="/etc/stated/stated.toml")
h = t.alloc(entity=42)
t.set(h, "hp", 77)
print("worker wrote", h)
'
stated get players 42 | grep -q '"hp": 77'
stated snapshot
test -n "$(find /var/lib/stated -user stated -name '*players*' -print -quit)"
kill -TERM $DAEMON          # unshare and sh exec'd: this is the daemon
wait $DAEMON
echo "daemon exit 0"
! grep -q Traceback "$S/daemon.log"
echo INSTALL-OK
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, overlay mounts)")
def test_readme_install_steps_in_a_scratch_root(tmp_path):
    missing = [t for t in NEEDED if not shutil.which(t, path=DEBIAN_PATH)]
    if missing:
        pytest.skip(f"missing tools: {missing}")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no Debian python3 (/usr/bin/python3)")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           timeout=30)
    if probe.returncode:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode().strip()}")
    copy_checkout(tmp_path / "src")
    script = tmp_path / "install.sh"
    script.write_text(_script(tmp_path, install_lines(README.read_text())))
    res = subprocess.run(["unshare", "--mount", "--ipc", "--pid", "--fork", "--kill-child", "--mount-proc",
                          "--propagation", "private", "bash", str(script)],
                         capture_output=True, text=True, timeout=300, env={"PATH": DEBIAN_PATH, "LANG": "C.UTF-8"})
    log = (tmp_path / "daemon.log").read_text() if (tmp_path / "daemon.log").exists() else ""
    assert res.returncode == 0 and "INSTALL-OK" in res.stdout, \
        f"{res.stdout[-6000:]}\n--- stderr\n{res.stderr[-6000:]}\n--- daemon log\n{log[-3000:]}"
