"""Hostile archives built byte by byte: what real attackers and broken tools produce.

Python's tarfile/zipfile refuse to write some of these (a NUL in a zip name, a header that lies about
its size), so those are patched in after writing. Bombs are real: a gzip or zip stream of repeated,
fully flushed deflate blocks of zeros, ~1 KiB per MiB, built in milliseconds.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
_ZEROS = bytes(MiB)


@dataclass(frozen=True)
class M:
    """A tar member: kind is file, dir, sym, hard, fifo or chr."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""


def tar_bytes(members: list[M], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mtime = 0
            info.mode = 0o644
            if m.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif m.kind in ("sym", "hard"):
                info.type = tarfile.SYMTYPE if m.kind == "sym" else tarfile.LNKTYPE
                info.linkname = m.target
            elif m.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif m.kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            if m.kind == "file":
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def write_tar(path: Path, members: list[M]) -> Path:
    path.write_bytes(tar_bytes(members))
    return path


def zip_bytes(entries: list[tuple[str, bytes, int | None]]) -> bytes:
    """(name, data, unix mode or None for zipfile's default) per entry; duplicates allowed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            info.create_system = 3
            zf.writestr(info, data)
    return buf.getvalue()


def zip_with_nul_name(path: Path) -> Path:
    """A zip whose member is named `evil.txt\\0.jpg`: zipfile would silently call it `evil.txt`."""
    raw = zip_bytes([("ok.txt", b"ok", None), ("evil.txtX.jpg", b"evil", None)])
    path.write_bytes(raw.replace(b"evil.txtX.jpg", b"evil.txt\x00.jpg"))
    return path


def zip_encrypted_flag(path: Path) -> Path:
    """A zip whose member claims to be encrypted (general purpose flag bit 0)."""
    raw = bytearray(zip_bytes([("secret.bin", b"data", None)]))
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = raw.find(sig)
        raw[i + off] |= 0x01
    path.write_bytes(bytes(raw))
    return path


def zip_lying_size(path: Path, declared: int, actual: bytes) -> Path:
    """A zip member whose headers declare `declared` bytes while its stream holds `actual`."""
    raw = bytearray(zip_bytes([("liar.bin", actual, None)]))
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = raw.find(sig)
        struct.pack_into("<I", raw, i + off, declared)
    path.write_bytes(bytes(raw))
    return path


def _zero_blocks(n_mib: int) -> tuple[bytes, bytes]:
    """(one fully flushed raw-deflate block of 1 MiB of zeros, the final empty block)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(_ZEROS) + c.flush(zlib.Z_FULL_FLUSH)
    return block, c.flush(zlib.Z_FINISH)


def gzip_tar_bomb(path: Path, unpacked: int, name: str = "zeros.bin") -> Path:
    """A tar.gz of one member of `unpacked` zero bytes (a multiple of 1 MiB): ~1 KiB per MiB.

    The gzip trailer's CRC is left 0: computing it costs a second per GiB, and an extractor that
    honours the declared size never gets that far (one that does not has already filled the disk)."""
    assert unpacked % MiB == 0
    info = tarfile.TarInfo(name)
    info.size = unpacked
    header = info.tobuf(tarfile.GNU_FORMAT)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block, _ = _zero_blocks(1)
    tail = c.compress(bytes(1024)) + c.flush(zlib.Z_FINISH)  # end-of-archive blocks
    gz_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    isize = (len(header) + unpacked + 1024) & 0xFFFFFFFF
    with open(path, "wb") as out:
        out.write(gz_header + head)
        for _ in range(unpacked // MiB):
            out.write(block)
        out.write(tail + struct.pack("<II", 0, isize))
    return path


def zip_bomb(path: Path, unpacked: int, name: str = "zeros.bin") -> Path:
    """A zip of one deflated member of `unpacked` zero bytes (< 4 GiB, a multiple of 1 MiB)."""
    assert unpacked % MiB == 0 and unpacked < 1 << 32
    block, final = _zero_blocks(1)
    data_len = len(block) * (unpacked // MiB) + len(final)
    fname = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, 0, data_len, unpacked, len(fname), 0)
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        0x0314,
        20,
        0,
        8,
        0,
        0x21,
        0,
        data_len,
        unpacked,
        len(fname),
        0,
        0,
        0,
        0,
        (stat.S_IFREG | 0o644) << 16,
        0,
    )
    cd_offset = len(local) + len(fname) + data_len
    cd_size = len(central) + len(fname)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, cd_size, cd_offset, 0)
    with open(path, "wb") as out:
        out.write(local + fname)
        for _ in range(unpacked // MiB):
            out.write(block)
        out.write(final + central + fname + eocd)
    return path
