import os

import pytest

from stated.errors import ConfigError
from stated.format import config as config_mod


def test_shipped_config_loads():
    cfg = config_mod.load("config/stated.toml")
    assert set(cfg.tables) == {"players", "world", "guilds"}
    players = cfg.tables["players"]
    assert players.key == 0x53540001 and players.capacity == 10000
    assert players.layout["level"].field.default == 1
    assert str(cfg.daemon.state_dir) == "/var/lib/stated"   # the service's paths (README install)
    assert str(cfg.daemon.control_socket) == "/run/stated/stated.sock"


def test_builtin_default_loads():
    cfg = config_mod.load(None)
    assert cfg.path == config_mod.BUILTIN and "players" in cfg.tables


def _load(tmp_path, text):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return config_mod.load(p), p


@pytest.mark.parametrize("text, table, field, words", [
    ('[tables.players]\ncapacity = 10\nfields = ["hp: i33"]', "players", "fields.hp", "unknown type"),
    ('[tables.players]\ncapacity = 10\nfields = ["hp i32"]', "players", "fields", "cannot parse"),
    ('[tables.players]\ncapacity = 0\nfields = ["hp: i32"]', "players", "capacity", "capacity"),
    ('[tables.players]\ncapacity = 10\nfields = ["name: str[4] = \\"toolong\\""]', "players", "fields.name",
     "at most 4"),
    ('[tables.players]\ncapacity = 10\nfields = ["a: u8", "a: u16"]', "players", "fields.a", "twice"),
    ('[tables.players]\nfields = ["a: u8"]', "players", "capacity", "required"),
    ('[tables.players]\ncapacity = 10\nfields = ["a: u8"]\ncolour = 1', "players", "colour", "unknown"),
    ('[tables.players]\ncapacity = "ten"\nfields = ["a: u8"]', "players", "capacity", "must be int"),
    ('[tables.players]\ncapacity = 10\nfields = ["a: u8 = 300"]', "players", "fields.a", "outside"),
    ('[tables.a]\nkey = 5\ncapacity = 1\nfields = ["a: u8"]\n[tables.b]\nkey = 5\ncapacity = 1\nfields = ["a: u8"]',
     "b", "key", "also used"),
    ('[tables.players]\ncapacity = 10\nfields = ["a: u8"]\ndead_owner = "burn"', "players", "dead_owner", "keep"),
])
def test_bad_config_names_file_table_field(tmp_path, text, table, field, words):
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, text)
    msg = str(ei.value)
    assert "bad.toml" in msg and f"table {table!r}" in msg and f"field {field!r}" in msg, msg
    assert words in msg


def test_world_readable_mode_refused(tmp_path):
    with pytest.raises(ConfigError, match="world"):
        _load(tmp_path, '[daemon]\nmode = 0o666\n[tables.p]\ncapacity = 1\nfields = ["a: u8"]')


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, "[tables.p\n")


def test_relative_paths_follow_the_config_file(tmp_path):
    cfg, p = _load(tmp_path, '[daemon]\nstate_dir = "snaps"\n[tables.p]\ncapacity = 1\nfields = ["a: u8"]')
    assert cfg.daemon.state_dir == tmp_path / "snaps"


def test_derived_keys_are_stable_and_distinct(tmp_path):
    cfg, _ = _load(tmp_path, '[tables.a]\ncapacity = 1\nfields = ["x: u8"]\n'
                             '[tables.b]\ncapacity = 1\nfields = ["x: u8"]')
    assert cfg.tables["a"].key != cfg.tables["b"].key
    assert cfg.tables["a"].key == config_mod.derive_key(0x53540000, "a")


def test_default_path_prefers_env_then_the_installed_config(tmp_path):
    system = tmp_path / "stated.toml"
    assert config_mod.default_path({}, str(system)) is None                  # built-in default
    system.write_text("")
    assert config_mod.default_path({}, str(system)) == str(system)           # the installed service's
    assert config_mod.default_path({"STATED_CONFIG": "/x.toml"}, str(system)) == "/x.toml"


def test_connection_settings(tmp_path):
    cfg, _ = _load(tmp_path, '[daemon]\nmax_connections = 8\nidle_timeout = 2.5\n[tables.p]\ncapacity = 1\n'
                             'fields = ["a: u8"]')
    assert (cfg.daemon.max_connections, cfg.daemon.idle_timeout) == (8, 2.5)
    cfg, _ = _load(tmp_path, '[tables.p]\ncapacity = 1\nfields = ["a: u8"]')
    assert (cfg.daemon.max_connections, cfg.daemon.idle_timeout) == (64, 10.0)
    for bad in ("max_connections = 0", "idle_timeout = 0", "idle_timeout = -1", 'max_connections = "many"'):
        with pytest.raises(ConfigError, match="max_connections|idle_timeout"):
            _load(tmp_path, f'[daemon]\n{bad}\n[tables.p]\ncapacity = 1\nfields = ["a: u8"]')


def _paths_cfg(tmp_path, state_dir="var", sock="run/stated.sock"):
    cfg, _ = _load(tmp_path, f'[daemon]\nstate_dir = "{state_dir}"\ncontrol_socket = "{sock}"\n'
                             f'[tables.p]\ncapacity = 1\nfields = ["a: u8"]')
    return cfg


def test_preflight_accepts_what_the_daemon_may_use(tmp_path):
    import socket
    config_mod.preflight(_paths_cfg(tmp_path))                 # nothing exists yet: created at start
    (tmp_path / "real-state").mkdir()
    os.symlink(tmp_path / "real-state", tmp_path / "var")        # the operator's symlink to a directory
    (tmp_path / "run").mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "run" / "stated.sock"))                # a stale socket: replaced at start
    s.close()
    config_mod.preflight(_paths_cfg(tmp_path))


@pytest.mark.parametrize("what", ["file", "dir", "symlink", "fifo"])
def test_preflight_refuses_a_control_socket_path_that_is_not_a_socket(tmp_path, what):
    (tmp_path / "run").mkdir()
    p = tmp_path / "run" / "stated.sock"
    {"file": lambda: p.write_text("keep me"), "dir": p.mkdir, "fifo": lambda: os.mkfifo(p),
     "symlink": lambda: os.symlink(tmp_path / "elsewhere", p)}[what]()
    with pytest.raises(ConfigError, match="control_socket.*not a socket"):
        config_mod.preflight(_paths_cfg(tmp_path))
    assert os.path.lexists(p)


def test_preflight_refuses_a_state_dir_that_is_not_a_directory(tmp_path):
    (tmp_path / "var").write_text("x")
    with pytest.raises(ConfigError, match="state_dir.*not a directory"):
        config_mod.preflight(_paths_cfg(tmp_path))
    with pytest.raises(ConfigError, match="state_dir.*not a directory"):
        config_mod.preflight(_paths_cfg(tmp_path, state_dir="var/sub"))
    with pytest.raises(ConfigError, match="control_socket.*not a directory"):
        config_mod.preflight(_paths_cfg(tmp_path, state_dir="ok", sock="var/stated.sock"))


def test_preflight_refuses_a_missing_group(tmp_path):
    cfg, _ = _load(tmp_path, '[daemon]\ngroup = "no-such-group-stated"\n[tables.p]\ncapacity = 1\nfields = ["a: u8"]')
    with pytest.raises(ConfigError, match="group.*does not exist"):
        config_mod.preflight(cfg)
