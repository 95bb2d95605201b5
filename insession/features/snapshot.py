"""The on-disk form of online feature state: one file per unit, a versioned header checked before the body.

A snapshot is a directory `snap-<offset>-<time>/` under the engine's state directory holding one file per
unit (`stream.state`, `partition-007.state`, `feature-<name>.state`), and `CURRENT` names the complete
one (written last, atomically). A file is

    header  magic "INSFEAT1" | format version u16 | partitions u16 | registry hash 16s | unit 48s |
            applied offset i64 | watermark i64 | body length u64 | checksum of the body 16s |
            crc32 of the header before it u32
    body    sections: name length u16, name, chunk count u32, then per chunk its length u64 and bytes

and each chunk is msgpack written by the aggregation's own codec (`Agg.capture`): plain ints, floats,
bytes, lists and maps, never pickled Python classes, so a refactor of the classes cannot break a data
directory. The body's checksum is crc32 (format 2, zero-padded) or blake2b-128 (format 1, still read):
a snapshot at a million shoppers is 1.1 GB, and blake2b over it cost ~1.0 s of CPU per snapshot on this
2-core machine against ~0.2 s for crc32 (zlib's, ~5 GB/s), CPU taken from serving every snapshot interval;
crc32 still detects every single-bit flip and burst up to 32 bits (what a damaged disk or a cut write
leaves), and the tests flip bits at random. Everything in the header is checked before a byte of the
body is decoded, and the body's checksum before it is parsed: a truncated, bit-flipped, older-format or
other-declarations file raises `SnapshotError` (the engine then sets the snapshot aside and rebuilds from
the log), never wrong state.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

MAGIC = b"INSFEAT1"
FORMAT_VERSION = 2  # 2: crc32 of the body; 1: blake2b-128 of the body (read, never written)
READABLE_VERSIONS = (1, 2)
_HEAD = struct.Struct("<8sHH16s48sqqQ16s")
_HEAD_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HEAD_CRC.size
_NAME_LEN, _COUNT, _CHUNK_LEN = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")

Sections = dict[str, list[bytes]]


class SnapshotError(ValueError):
    """A snapshot file that must not be loaded: what is wrong and in which file."""


class UnitHeader:
    """What a unit file says about itself; `expect` checks it against the running engine."""

    __slots__ = ("partitions", "registry_hash", "unit", "offset", "watermark")

    def __init__(self, partitions: int, registry_hash: str, unit: str, offset: int, watermark: int) -> None:
        self.partitions, self.registry_hash, self.unit = partitions, registry_hash, unit
        self.offset, self.watermark = offset, watermark


def _body_frames(sections: Sections) -> Iterable[bytes]:
    for name, chunks in sections.items():
        raw = name.encode()
        yield _NAME_LEN.pack(len(raw)) + raw + _COUNT.pack(len(chunks))
        for chunk in chunks:
            yield _CHUNK_LEN.pack(len(chunk))
            yield chunk


def write_unit(path: Path, header: UnitHeader, sections: Sections) -> None:
    """Write one unit file and fsync it (the caller renames the directory into place)."""
    frames = list(_body_frames(sections))
    crc = length = 0
    for frame in frames:
        crc = zlib.crc32(frame, crc)
        length += len(frame)
    head = _HEAD.pack(
        MAGIC, FORMAT_VERSION, header.partitions, header.registry_hash.encode().ljust(16, b"\0"),
        header.unit.encode().ljust(48, b"\0"), header.offset, header.watermark, length, _crc_digest(crc),
    )
    with path.open("wb") as f:
        f.write(head + _HEAD_CRC.pack(zlib.crc32(head)))
        for frame in frames:
            f.write(frame)
        f.flush()
        os.fsync(f.fileno())


def _crc_digest(crc: int) -> bytes:
    return crc.to_bytes(4, "little").ljust(16, b"\0")


def _digest(version: int, body: bytes) -> bytes:
    """The body's checksum as the header of format `version` stores it."""
    if version == 1:
        return hashlib.blake2b(body, digest_size=16).digest()
    return _crc_digest(zlib.crc32(body))


def _read_header(f: BinaryIO, path: Path) -> tuple[UnitHeader, int, int, bytes]:
    raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise SnapshotError(f"{path.name}: truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
    head, (crc,) = raw[: _HEAD.size], _HEAD_CRC.unpack_from(raw, _HEAD.size)
    magic, version, partitions, reg, unit, offset, wm, length, digest = _HEAD.unpack(head)
    if magic != MAGIC:
        raise SnapshotError(f"{path.name}: not an insession feature snapshot (magic {magic!r})")
    if zlib.crc32(head) != crc:
        raise SnapshotError(f"{path.name}: header checksum mismatch")
    if version not in READABLE_VERSIONS:
        raise SnapshotError(f"{path.name}: format version {version}, this insession reads {READABLE_VERSIONS}")
    header = UnitHeader(partitions, reg.rstrip(b"\0").decode(), unit.rstrip(b"\0").decode(), offset, wm)
    return header, version, length, digest


def read_header(path: Path) -> UnitHeader:
    """The header of a unit file, checked (magic, format, its own crc32) but not the body."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise SnapshotError(f"{path.name}: cannot be read ({e.strerror})") from None
    with f:
        return _read_header(f, path)[0]


def read_unit(path: Path, expect: UnitHeader) -> tuple[UnitHeader, Sections]:
    """Read and verify one unit file: header fields (all but offset and watermark) must equal `expect`'s,
    the body must have its length and checksum. Raises SnapshotError naming what is wrong."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise SnapshotError(f"{path.name}: cannot be read ({e.strerror})") from None
    with f:
        header, version, length, digest = _read_header(f, path)
        for field in ("partitions", "registry_hash", "unit"):
            if getattr(header, field) != getattr(expect, field):
                raise SnapshotError(
                    f"{path.name}: {field} is {getattr(header, field)!r}, the engine has {getattr(expect, field)!r}"
                )
        body = f.read(length + 1)
    if len(body) != length:
        raise SnapshotError(f"{path.name}: body is {len(body)} bytes, the header says {length}")
    if _digest(version, body) != digest:
        raise SnapshotError(f"{path.name}: body checksum mismatch")
    sections: Sections = {}
    view, pos = memoryview(body), 0
    try:
        while pos < length:
            (n,) = _NAME_LEN.unpack_from(view, pos)
            name = bytes(view[pos + 2 : pos + 2 + n]).decode()
            pos += 2 + n
            (count,) = _COUNT.unpack_from(view, pos)
            pos += _COUNT.size
            chunks = []
            for _ in range(count):
                (size,) = _CHUNK_LEN.unpack_from(view, pos)
                pos += _CHUNK_LEN.size
                chunks.append(bytes(view[pos : pos + size]))
                pos += size
            sections[name] = chunks
    except (struct.error, UnicodeDecodeError) as e:
        raise SnapshotError(f"{path.name}: malformed body ({e})") from None
    if pos != length:
        raise SnapshotError(f"{path.name}: malformed body (sections overrun the body)")
    return header, sections
