"""`text`: the bytes case of `lm` (split by document text, packed with byte 0xFF between
documents, the stdlib as default corpus), its config keys and its bad-input messages."""

import numpy as np
import pytest

from ouro_lab.config import ConfigError, load_config
from ouro_lab.data import SPLITS
from ouro_lab.data import lm
from ouro_lab.data.text import TextConfig, TextTask


@pytest.fixture
def corpus_dir(tmp_path):
    """60 files, each one letter (of 30) repeated (a window's letters say which files it came from)."""
    root = tmp_path / "notes"
    for i in range(60):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        letter = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcd"[i % 30]
        (sub / f"f{i:02d}.md").write_text(letter * (200 + 7 * i))
    (root / "skip.bin").write_bytes(b"\0\1\2" * 10)  # not matched by *.md
    return root


def text_task(tmp_path, paths, **kw) -> TextTask:
    return TextTask(TextConfig(paths=str(paths), cache_dir=str(tmp_path / "cache"), **kw))


def test_split_by_document_and_windows_come_from_their_split(corpus_dir, tmp_path):
    task = text_task(tmp_path, corpus_dir / "**" / "*.md", context=32, buckets=4)
    files = lm.source_files(str(corpus_dir / "**" / "*.md"))
    assert len(files) == 60 and task.vocab_size == 256 and task.tokenizer.eod == 0xFF
    by_split = {s: [f for f in files if lm.split_of_document(f.read_text()) == i] for i, s in enumerate(SPLITS)}
    assert all(by_split[s] for s in SPLITS) and sum(map(len, by_split.values())) == 60
    facts = task.describe()
    for split in SPLITS:
        # a split is its documents' bytes, each followed by 0xFF, and nothing else
        joined = b"".join(f.read_bytes() + b"\xff" for f in sorted(by_split[split]))
        assert bytes(np.asarray(task.split_tokens(split))) == joined
        assert facts[f"corpus_{split}_documents"] == len(by_split[split])
        assert facts[f"corpus_{split}_bytes"] == len(joined) - len(by_split[split])
        a = task.sample(np.random.default_rng(1), 100, split)
        b = task.sample(np.random.default_rng(1), 100, split)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.targets[:, :-1], a.tokens[:, 1:])
        for tokens, targets in zip(a.tokens[:20], a.targets[:20]):
            assert bytes([*tokens, targets[-1]]) in joined
        np.testing.assert_array_equal(a.difficulty[0], np.repeat([1, 2, 3, 4], 8))
    # the split depends on the text alone, not on where the files live
    moved = corpus_dir.parent / "moved"
    corpus_dir.rename(moved)
    again = text_task(tmp_path, moved / "**" / "*.md", context=32)
    assert again.describe() | {"corpus_key": None} == facts | {"corpus_key": None}


def test_byte_tokens_cover_one_byte_each_and_end_of_document_none():
    tok = lm.ByteTokenizer()
    ids = tok.encode_batch(["héllo 日本"])[0]
    assert tok.vocab_size == 256 and 0xFF not in ids and tok.decode([*ids, 0xFF]) == "héllo 日本"
    assert tok.token_bytes()[ids].sum() == len("héllo 日本".encode()) and tok.token_bytes()[0xFF] == 0


def test_stdlib_is_the_default_corpus(tmp_path):
    task = TextTask(TextConfig(cache_dir=str(tmp_path / "cache")))
    files = lm.source_files("stdlib")
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any(lm.STDLIB_EXCLUDED & set(f.parts) for f in files)
    facts = task.describe()
    assert facts["corpus_files"] == len(files) and facts["corpus_val_documents"] >= 5
    assert facts["tokenizer_vocab"] == 256
    batch = task.sample(np.random.default_rng(0), 8, "val")
    assert batch.tokens.shape == (8, 128) and batch.tokens.max() <= 255


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "**" / "*.rst"), "matches no files"),
    (lambda d: str(d), "is a folder; give a glob of its files"),
    (lambda d: str(d / "**" / "*"), "is not a text file (NUL bytes); narrow data.text.paths"),
    (lambda d: str(d / "a" / "f01.md"), "split (0 document(s), 0 tokens) is shorter than one window of "
                                        "data.text.context + 1"),
])
def test_bad_corpus_fails_before_training_naming_the_key(corpus_dir, tmp_path, make, message):
    with pytest.raises(ConfigError) as err:
        load_config("conf/text.yaml", [f"data.text.paths={make(corpus_dir)}", f"data.text.cache_dir={tmp_path}/c"])
    assert "data.text.paths: " in str(err.value) and message in str(err.value)


def test_latin1_file_is_refused_or_replaced_and_short_splits_are_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(120):  # 8 of them val, 2 test
        (corpus / f"{i}.txt").write_bytes("é".encode("latin-1") * 50 if i == 1 else f"hello world {i}\n".encode() * 9)
    base = [f"data.text.paths={corpus}/*.txt", f"data.text.cache_dir={tmp_path}/c", "data.text.context=32"]
    with pytest.raises(ConfigError, match=r"data.text.paths: .*1.txt is not UTF-8 text \(byte 0\).* "
                                          r"data.text.decode_errors=replace"):
        load_config("conf/text.yaml", base)
    assert load_config("conf/text.yaml", [*base, "data.text.decode_errors=replace"]).data.text.decode_errors == "replace"
    with pytest.raises(ConfigError, match=r"data.text.paths: the (val|test) split .* shorter than one window"):
        load_config("conf/text.yaml", [*base, "data.text.decode_errors=skip", "data.text.context=512"])


def test_symlinks_out_of_the_root_and_duplicates(tmp_path):
    """A link to a file outside the corpus folder (Debian's stdlib has one) keeps its name; a file
    reached twice (a link inside the folder) counts once."""
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("outside text\n" * 20)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.txt").write_text(f"file {i}\n" * 20)
    (root / "link_out.txt").symlink_to(outside)
    (root / "link_in.txt").symlink_to(root / "0.txt")
    names = sorted(f.name for f in lm.source_files(str(root / "*.txt")))
    assert names == ["0.txt", "1.txt", "2.txt", "3.txt", "link_out.txt"]
