import struct

import pytest
import sysv_ipc
from helpers import player_layout

import stated
from stated.errors import CorruptSegment, ForeignSegment, LayoutMismatch, SegmentExists, SegmentNotFound
from stated.format import segment as fmt
from stated.shm import segment


def test_create_then_open_validates(make_segment):
    key = make_segment(capacity=50)
    seg = segment.open(key, expect=player_layout(), expect_capacity=50)
    assert seg.header.capacity == 50 and seg.header.record_size == 200
    assert fmt.read_state(seg.buf) == fmt.STATE_READY
    assert seg.shm.mode & 0o777 == 0o600
    seg.detach()


def test_create_refuses_existing(make_segment):
    key = make_segment()
    with pytest.raises(SegmentExists):
        segment.create(key, 10, player_layout())


def test_missing_segment_names_key_and_fix(new_key):
    key = new_key()
    with pytest.raises(SegmentNotFound) as ei:
        stated.attach(key=key, owner="w")
    assert f"{key:#010x}" in str(ei.value) and "stated run" in str(ei.value)


def test_layout_mismatch_shows_field_differences(make_segment):
    key = make_segment()
    other = player_layout(["id: u64", "name: str[32]", "level: u32", "mana: i32"])
    with pytest.raises(LayoutMismatch) as ei:
        segment.open(key, expect=other)
    msg = str(ei.value)
    assert "+ mana: i32" in msg and "~ level: u16 -> level: u32" in msg and "- hp: i32" in msg


def test_foreign_segment_refused_and_kept(new_key):
    key = new_key()
    shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, 0o600, 65536)
    shm.write(b"not ours" * 10)
    with pytest.raises(CorruptSegment, match="another program"):
        segment.open(key)
    with pytest.raises(ForeignSegment):
        segment.destroy(key)
    assert shm.read(8) == b"not ours"     # untouched
    shm.detach()


def _corrupt(key, offset, data):
    shm = sysv_ipc.SharedMemory(key)
    shm.write(data, offset)
    shm.detach()


@pytest.mark.parametrize("offset, data, words", [
    (8, struct.pack("<I", 99), "format version"),
    (28, struct.pack("<I", 7), "checksum"),                 # capacity changed behind the crc
    (40, struct.pack("<Q", 1 << 40), "checksum"),           # slots offset pointing past the end
    (fmt.SCHEMA_OFFSET + 3, b"\xff\xff", "checksum"),        # schema blob damaged
    (120, b"\0\0\0\0", "checksum"),                          # crc wiped
])
def test_corrupt_header_refused(make_segment, offset, data, words):
    key = make_segment()
    _corrupt(key, offset, data)
    with pytest.raises(CorruptSegment, match=words):
        segment.open(key)


def test_consistent_lies_are_still_caught(make_segment):
    """A header rewritten with a valid crc but offsets that do not match its capacity."""
    import zlib
    key = make_segment(capacity=10)
    shm = sysv_ipc.SharedMemory(key)
    buf = memoryview(shm)
    struct.pack_into("<Q", buf, 64, 1 << 30)          # records_offset far away
    blob = bytes(buf[fmt.SCHEMA_OFFSET:fmt.SCHEMA_OFFSET + struct.unpack_from("<I", buf, 80)[0]])
    struct.pack_into("<I", buf, fmt.OFF_CRC, zlib.crc32(bytes(buf[0:120]) + blob))
    buf.release()
    shm.detach()
    with pytest.raises(CorruptSegment, match="records_offset"):
        segment.open(key)


def test_size_mismatch(new_key):
    key = new_key()
    head, r = fmt.build_header(key, 10, player_layout())
    shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, 0o600, r.total_size + 4096, init_character=b"\0")
    shm.write(head)
    fmt.write_state(memoryview(shm), fmt.STATE_READY)
    shm.detach()
    with pytest.raises(CorruptSegment, match="size mismatch"):
        segment.open(key)


def test_readonly_attach_cannot_write(make_segment):
    key = make_segment()
    seg = segment.open(key, readonly=True)
    with pytest.raises(TypeError):
        seg.buf[0] = 1
    seg.detach()


def test_destroy_removes_segment_and_semaphore(make_segment):
    key = make_segment()
    assert segment.destroy(key)
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(key)
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.Semaphore(key)
    assert not segment.destroy(key)
