"""`text`: corpus discovery, split by file, windows recomputed from the files, bad input."""

import numpy as np
import pytest

from ouro_lab.config import ConfigError, load_config
from ouro_lab.data import SPLITS
from ouro_lab.data.text import STDLIB_EXCLUDED, TextConfig, TextTask, find_corpus


@pytest.fixture
def corpus_dir(tmp_path):
    """40 files, each one letter repeated (a window's letters say which files it came from)."""
    root = tmp_path / "notes"
    for i in range(40):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        letter = chr(ord("A") + i % 26) if i < 26 else chr(ord("a") + i - 26)
        (sub / f"f{i:02d}.md").write_text(letter * (200 + 7 * i))
    (root / "skip.bin").write_bytes(b"\0\1\2" * 10)  # not matched by *.md
    return root


def test_split_by_file_and_windows_come_from_their_split(corpus_dir):
    task = TextTask(TextConfig(paths=str(corpus_dir / "**" / "*.md"), context=32, buckets=4))
    corpus = task.corpus
    assert len(corpus.files) == 40 and all(f.suffix == ".md" for f in corpus.files)
    train, val, test = (set(s) for s in corpus.splits)
    assert len(val) == len(test) == 2 and len(train) == 36 and not (train & val or train & test or val & test)
    letters = {name: {f.read_text()[0] for f in files} for name, files in zip(SPLITS, corpus.splits)}
    for i, split in enumerate(SPLITS):
        a = task.sample(np.random.default_rng(i), 200, split)
        b = task.sample(np.random.default_rng(i), 200, split)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert {chr(c) for c in np.unique(a.tokens)} <= letters[split]
        # the label at every position is the next byte of the same stretch of the split's files
        np.testing.assert_array_equal(a.targets[:, :-1], a.tokens[:, 1:])
        joined = b"".join(f.read_bytes() for f in corpus.splits[i])
        for tokens, targets in zip(a.tokens[:20], a.targets[:20]):
            assert bytes([*tokens, targets[-1]]) in joined
        np.testing.assert_array_equal(a.difficulty[0], np.repeat([1, 2, 3, 4], 8))
    assert not np.array_equal(task.sample(np.random.default_rng(0), 50, "train").tokens,
                              task.sample(np.random.default_rng(1), 50, "train").tokens)
    # the split depends on the paths relative to the corpus root, not on where it lives
    moved = corpus_dir.parent / "moved"
    corpus_dir.rename(moved)
    find_corpus.cache_clear()
    again = find_corpus(str(moved / "**" / "*.md"))
    assert [[f.name for f in s] for s in again.splits] == [[f.name for f in s] for s in corpus.splits]
    assert again.fingerprint == corpus.fingerprint


def test_stdlib_is_the_default_corpus():
    task = TextTask(TextConfig())
    corpus = task.corpus
    assert len(corpus.files) > 100 and all(f.suffix == ".py" for f in corpus.files)
    assert not any(STDLIB_EXCLUDED & set(f.relative_to(corpus.root).parts[:-1]) for f in corpus.files)
    assert all(len(s) >= 5 for s in corpus.splits)
    facts = task.describe()
    assert facts["corpus_files"] == len(corpus.files) and facts["corpus_val_files"] == len(corpus.splits[1])
    batch = task.sample(np.random.default_rng(0), 8, "val")
    assert batch.tokens.shape == (8, 128) and task.vocab_size == 256


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "**" / "*.rst"), "matches no files"),
    (lambda d: str(d), "is a folder; give a glob of its text files"),
    (lambda d: str(d / "**" / "*"), "is not a text file (NUL bytes)"),
    (lambda d: str(d / "a" / "f01.md"), "matches 1 file(s); the train/val/test split is by file and needs at least 3"),
])
def test_bad_corpus_fails_before_training_naming_the_key(corpus_dir, make, message):
    with pytest.raises(ConfigError) as err:
        load_config("conf/text.yaml", [f"data.text.paths={make(corpus_dir)}"])
    assert "data.text.paths: " in str(err.value) and message in str(err.value)


def test_latin1_file_is_not_text_and_short_splits_are_refused(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_bytes("é".encode("latin-1") * 50 if i == 1 else b"hello world\n")
    with pytest.raises(ConfigError, match=r"data.text.paths: .*1.txt is not a text file \(not UTF-8 at byte 0\)"):
        load_config("conf/text.yaml", [f"data.text.paths={tmp_path}/*.txt"])
    (tmp_path / "1.txt").write_text("short")
    with pytest.raises(ConfigError, match=r"data.text.paths: the (val|test) split .* shorter than one window"):
        load_config("conf/text.yaml", [f"data.text.paths={tmp_path}/*.txt", "data.text.context=64"])


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
    corpus = find_corpus(str(root / "*.txt"))
    names = sorted(f.name for f in corpus.files)
    assert names == ["0.txt", "1.txt", "2.txt", "3.txt", "link_out.txt"]
    assert sum(len(s) for s in corpus.splits) == 5
