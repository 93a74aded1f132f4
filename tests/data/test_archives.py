"""The pure-Python .deb and R data readers, on archives built in the test (no download)."""

import io
import struct
import tarfile
import zlib

import pytest

from sala.data.archives import ar_members, deb_member, r_character_vector, rdb_blobs


def _r_strings(lines, version=3):
    head = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        head += struct.pack(">i", 5) + b"UTF-8"
    body = struct.pack(">ii", 16, len(lines))
    for s in lines:
        if s is None:
            body += struct.pack(">ii", 0x00040009, -1)
        else:
            b = s.encode()
            body += struct.pack(">ii", 0x00040009, len(b)) + b
    return head + body


def _r_ints(values):
    return b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + struct.pack(">ii", 13, len(values)) + \
        struct.pack(f">{len(values)}i", *values)


def _rdb(blobs):
    return b"".join(struct.pack(">I", len(b)) + zlib.compress(b) for b in blobs)


def _ar(members):
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        if len(data) % 2:
            out += b"\n"
    return out


def _tar_xz(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_r_character_vector_v2_v3_and_na():
    lines = ["PERSUASION", "", None, "Chapter 1", "caf\u00e9"]
    for v in (2, 3):
        assert r_character_vector(_r_strings(lines, v)) == ["PERSUASION", "", "", "Chapter 1", "caf\u00e9"]
    assert r_character_vector(_r_ints([1, 2, 3])) is None
    with pytest.raises(ValueError):
        r_character_vector(b"A\nbinary")


def test_rdb_blobs_and_deb_member():
    blobs = [_r_strings(["EMMA", "text"]), _r_ints([7]), _r_strings(["SENSE AND SENSIBILITY"])]
    rdb = _rdb(blobs)
    assert rdb_blobs(rdb) == blobs
    deb = _ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({"./control": b"x"}),
               "data.tar.xz": _tar_xz({"./usr/lib/R/site-library/pkg/data/Rdata.rdb": rdb, "./odd": b"abc"})})
    assert set(ar_members(deb)) == {"debian-binary", "control.tar.xz", "data.tar.xz"}
    assert deb_member(deb, "/pkg/data/Rdata.rdb") == rdb
    with pytest.raises(ValueError, match="no file ending"):
        deb_member(deb, "missing.rdb")
    with pytest.raises(ValueError, match="not an ar archive"):
        ar_members(b"PK\x03\x04")
    with pytest.raises(ValueError, match="header says"):
        rdb_blobs(struct.pack(">I", 99) + zlib.compress(b"short"))


def test_austen_source_names_novels_by_title(tmp_path, monkeypatch):
    from sala.data import corpora

    rdb = _rdb([_r_strings(["", "PRIDE AND PREJUDICE", "", "By Jane Austen", "It is a truth..."]),
                _r_strings(["NORTHANGER ABBEY", "Chapter 1"]), _r_ints([1])])
    deb = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n",
                         "data.tar.xz": _tar_xz({"./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb": rdb})}))
    monkeypatch.setattr(corpora, "apt_deb", lambda name, dest: deb)
    docs = corpora.SOURCES["austen"].extract(tmp_path)
    assert sorted(docs) == ["northanger_abbey", "pride_and_prejudice"]
    assert docs["pride_and_prejudice"] == "\nPRIDE AND PREJUDICE\n\nBy Jane Austen\nIt is a truth..."
