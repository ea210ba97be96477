"""Layout migration: add, widen, reorder keep data; remove refused without --allow-lossy; from a snapshot too."""
import subprocess

import pytest
from helpers import PLAYER_FIELDS, STATED, player_layout

import stated
from stated.daemon import provision
from stated.errors import LayoutMismatch
from stated.format import config as config_mod
from stated.persist.saver import MigrationRefused
from stated.shm import segment


def _setup(write_config, fields=None, capacity=200):
    path = write_config({"players": {"capacity": capacity, "fields": fields or PLAYER_FIELDS}})
    cfg = config_mod.load(path)
    seg, how, _ = provision.ensure(cfg.tables["players"], cfg.daemon)
    seg.detach()
    return path, cfg


def _rewrite(path, old_fields, new_fields, capacity=None):
    text = path.read_text().replace(repr(old_fields).replace("'", '"'), repr(new_fields).replace("'", '"'))
    if capacity:
        text = text.replace("capacity = 200", f"capacity = {capacity}")
    path.write_text(text)
    return config_mod.load(path)


def _populate(key, n=50):
    with stated.attach(key=key, owner="zone-1") as t:
        for i in range(n):
            h = t.alloc(entity=100 + i)
            with t.write(h) as p:
                p.name = f"p{i}"
                p.hp = -i
                p.level = i
                p.inventory = [i, i * 2]
        t.free(t.lookup(100))
        return {t.entity(h): (h, t.read(h).to_dict()) for h in t.owned()}


NEW = ["gold: u64", "name: str[48]", "id: u64", "level: u32", "hp: i64 = 100", "x: f64", "y: f32", "z: f32",
       "zone: u16", "inventory: u32[40]", "mana: i32 = 50"]


def test_add_widen_reorder_keeps_everything(write_config):
    path, cfg = _setup(write_config)
    key = cfg.tables["players"].key
    before = _populate(key)
    cfg2 = _rewrite(path, PLAYER_FIELDS, NEW, capacity=300)
    tc = cfg2.tables["players"]
    with pytest.raises(LayoutMismatch) as ei:
        provision.ensure(tc, cfg2.daemon)
    assert "+ mana: i32" in str(ei.value) and "~ level: u16 -> level: u32" in str(ei.value)
    seg, how, n = provision.ensure(tc, cfg2.daemon, migrate=True)
    seg.detach()
    assert how == "migrated" and n == len(before)
    with stated.attach("players", owner="zone-1", config=str(path)) as t:
        assert t.capacity == 300 and t.layout.hash == tc.layout.hash
        assert {t.entity(h): h for h in t.owned()} == {e: h for e, (h, _) in before.items()}
        for e, (h, old) in before.items():
            r = t.read(h).to_dict()
            assert r["mana"] == 50                            # new field: its default
            for k, v in old.items():
                if k == "inventory":
                    assert r[k][:32] == v and r[k][32:] == [0] * 8
                else:
                    assert r[k] == v, k
            assert t.lookup(e) == h
        assert t.verify() == []
        t.alloc(entity=1)
    # the C header generated now describes the new segment
    out = subprocess.run([*STATED, "header", "--config", str(path)], capture_output=True, text=True, check=True)
    assert f"{tc.layout.hash:#x}".lower()[2:] in out.stdout.lower()


def test_removed_field_refused_without_allow_lossy(write_config):
    path, cfg = _setup(write_config)
    key = cfg.tables["players"].key
    before = _populate(key, 10)
    fields = [f for f in PLAYER_FIELDS if not f.startswith("gold")] + ["name2: str[4]"]
    fields = [f.replace("hp: i32", "hp: i16") for f in fields]
    cfg2 = _rewrite(path, PLAYER_FIELDS, fields)
    tc = cfg2.tables["players"]
    with pytest.raises(MigrationRefused) as ei:
        provision.ensure(tc, cfg2.daemon, migrate=True)
    assert "'gold'" in str(ei.value) and "removed" in str(ei.value) and "'hp'" in str(ei.value)
    with stated.attach(key=key, readonly=True) as ro:          # nothing touched
        assert ro.layout.hash == cfg.tables["players"].layout.hash and len(ro) == len(before)
    seg, how, n = provision.ensure(tc, cfg2.daemon, migrate=True, allow_lossy=True)
    seg.detach()
    with stated.attach(key=key, readonly=True) as ro:
        r = ro.read(before[105][0])
        assert r.hp == -5 and r.name == "p5" and not hasattr(r, "gold")


def test_migration_refused_while_workers_attached(write_config):
    path, cfg = _setup(write_config)
    key = cfg.tables["players"].key
    _populate(key, 3)
    cfg2 = _rewrite(path, PLAYER_FIELDS, PLAYER_FIELDS + ["mana: i32"])
    with stated.attach(key=key, owner="busy"):
        with pytest.raises(MigrationRefused, match="attached"):
            provision.ensure(cfg2.tables["players"], cfg2.daemon, migrate=True)


def test_migrating_from_a_snapshot_after_a_reboot(write_config):
    from stated.persist import saver as persist
    from stated.shm.allocator import Allocator
    path, cfg = _setup(write_config)
    tc = cfg.tables["players"]
    before = _populate(tc.key, 20)
    seg = segment.open(tc.key)
    a = Allocator(seg, table="players")
    s = persist.Saver(tc, seg, a, cfg.daemon)
    s.save("full")
    s.close()
    a.release_views()
    seg.detach()
    segment.destroy(tc.key)                                     # the reboot
    cfg2 = _rewrite(path, PLAYER_FIELDS, NEW)
    with pytest.raises(LayoutMismatch, match="--migrate"):
        provision.ensure(cfg2.tables["players"], cfg2.daemon)
    seg, how, n = provision.ensure(cfg2.tables["players"], cfg2.daemon, migrate=True)
    seg.detach()
    assert how == "restored" and n == len(before)
    with stated.attach(key=tc.key, readonly=True) as ro:
        for _e, (h, old) in before.items():
            r = ro.read(h)
            assert (r.name, r.hp, r.level, r.mana) == (old["name"], old["hp"], old["level"], 50)


def test_dropping_a_field_named_like_capacity_is_allowed_with_allow_lossy(write_config):
    """Lossiness is decided from structured changes, not from words in their messages."""
    fields = PLAYER_FIELDS + ["bag_capacity: u16 = 8"]
    path, cfg = _setup(write_config, fields=fields)
    key = cfg.tables["players"].key
    before = _populate(key, 10)
    cfg2 = _rewrite(path, fields, PLAYER_FIELDS)
    tc = cfg2.tables["players"]
    with pytest.raises(MigrationRefused, match="'bag_capacity'.*removed.*--allow-lossy"):
        provision.ensure(tc, cfg2.daemon, migrate=True)
    seg, how, n = provision.ensure(tc, cfg2.daemon, migrate=True, allow_lossy=True)
    seg.detach()
    assert how == "migrated" and n == len(before)
    with stated.attach(key=key, readonly=True) as ro:
        assert ro.layout.hash == tc.layout.hash and not hasattr(ro.read(before[105][0]), "bag_capacity")


def test_lossy_changes_are_structured():
    from stated.persist import migrate
    old = player_layout(PLAYER_FIELDS + ["capacity_left: u8"])
    new = player_layout([f.replace("hp: i32", "hp: i16") for f in PLAYER_FIELDS])
    changes = migrate.lossy_changes(old, new, 200, 100, 150)
    assert {(c.kind, c.field) for c in changes} == {("removed", "capacity_left"), ("narrowed", "hp"),
                                                     ("capacity", None)}
    assert [c.kind for c in changes if not c.allowed_with_flag] == ["capacity"]
    assert "would drop allocated slot 150" in str(changes[-1])


def test_shrinking_below_an_allocated_slot_is_refused_even_with_allow_lossy(write_config):
    path, cfg = _setup(write_config)
    key = cfg.tables["players"].key
    _populate(key, 50)
    cfg2 = _rewrite(path, PLAYER_FIELDS, PLAYER_FIELDS, capacity=20)
    with pytest.raises(MigrationRefused, match="capacity 200 -> 20 would drop allocated slot"):
        provision.ensure(cfg2.tables["players"], cfg2.daemon, migrate=True, allow_lossy=True)
    with stated.attach(key=key, readonly=True) as ro:          # nothing touched
        assert ro.capacity == 200 and len(ro) == 49
