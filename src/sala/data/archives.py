"""Read what the corpus packages ship, in pure Python: a member of a Debian ``.deb`` (an ``ar`` archive
holding ``data.tar.{xz,gz,bz2}``) and the character vectors of an R lazy-load database (``*.rdb``).

R is not needed: an ``.rdb`` is a sequence of blobs, each a 4-byte big-endian length and a zlib stream of
R's XDR serialization; the data packages used here store one character vector (STRSXP) per blob.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib


def ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the outer format of a ``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (missing '!<arch>' magic)")
    out, p = {}, 8
    while p + 60 <= len(data):
        header = data[p : p + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = data[p + 60 : p + 60 + size]
        p += 60 + size + (size & 1)  # members are 2-byte aligned
    return out


def deb_member(deb: bytes, path_suffix: str) -> bytes:
    """The file of a ``.deb``'s data archive whose path ends with ``path_suffix``."""
    members = ar_members(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError(f"no data.tar.* in the .deb (members: {sorted(members)})")
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.endswith(path_suffix):
                return tar.extractfile(m).read()
    raise ValueError(f"no file ending in {path_suffix!r} in the .deb's {data_name}")


def rdb_blobs(rdb: bytes) -> list[bytes]:
    """The decompressed serializations stored one after another in an R ``.rdb`` file."""
    out, p = [], 0
    while p < len(rdb):
        (n,) = struct.unpack(">I", rdb[p : p + 4])
        d = zlib.decompressobj()
        raw = d.decompress(rdb[p + 4 :])
        if len(raw) != n:
            raise ValueError(f"R blob at byte {p}: {len(raw)} bytes decompressed, header says {n}")
        p = len(rdb) - len(d.unused_data)
        out.append(raw)
    return out


STRSXP, CHARSXP = 16, 9


def r_character_vector(blob: bytes) -> list[str] | None:
    """A serialized R character vector (XDR format 2 or 3) -> its strings (NA -> ""); None if not one."""
    if not blob.startswith(b"X\n"):
        raise ValueError("not an XDR R serialization")
    p = 2

    def i32() -> int:
        nonlocal p
        (v,) = struct.unpack(">i", blob[p : p + 4])
        p += 4
        return v

    version = i32()
    i32(), i32()  # R version that wrote it, minimal version to read it
    if version == 3:
        n_enc = i32()  # native encoding name (read the length first: i32 moves p)
        p += n_enc
    flags = i32()
    if flags & 0xFF != STRSXP or flags & (1 << 9):  # not a character vector, or one with attributes
        return None
    out = []
    for _ in range(i32()):
        if i32() & 0xFF != CHARSXP:
            raise ValueError("malformed character vector")
        n = i32()
        out.append("" if n == -1 else blob[p : p + n].decode("utf-8", "replace"))
        p += max(n, 0)
    return out
