import itertools

import numpy as np
import pytest

from ouro_lab.data import TASKS, get_task, split_of
from ouro_lab.data.arith import ArithConfig, ArithTask
from ouro_lab.data.state import StateConfig, StateTask, group_table
from ouro_lab.data import IGNORE_INDEX


def rows(batch):
    return {tuple(r) for r in batch.tokens.tolist()}


@pytest.mark.parametrize("task", [StateTask(StateConfig()), ArithTask(ArithConfig(modulus=7, max_ops=3))])
def test_deterministic_by_seed_and_splits_disjoint(task):
    a = task.sample(np.random.default_rng(3), 256, "train")
    b = task.sample(np.random.default_rng(3), 256, "train")
    c = task.sample(np.random.default_rng(4), 256, "train")
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.tokens, c.tokens)
    train = task.sample(np.random.default_rng(0), 4000, "train")
    val = task.sample(np.random.default_rng(1), 500, "val")
    test = task.sample(np.random.default_rng(2), 500, "test")
    assert not rows(train) & rows(val)
    assert not rows(train) & rows(test)
    assert not rows(val) & rows(test)
    assert (split_of(val.tokens) == 1).all() and (split_of(test.tokens) == 2).all()


def test_split_hash_is_balanced():
    tokens = np.random.default_rng(0).integers(0, 6, size=(20000, 16))
    shares = np.bincount(split_of(tokens), minlength=3) / len(tokens)
    np.testing.assert_allclose(shares, [0.9, 0.05, 0.05], atol=0.01)


def compose(a, b):
    """(a∘b)(i) = a[b[i]] on permutation tuples."""
    return tuple(a[i] for i in b)


@pytest.mark.parametrize("group", ["S3", "A5", "Z5"])
def test_state_labels_are_prefix_products(group):
    task = StateTask(StateConfig(group=group, length=12, buckets=3))
    batch = task.sample(np.random.default_rng(0), 50, "train")
    if group.startswith("Z"):
        np.testing.assert_array_equal(batch.targets, np.cumsum(batch.tokens, axis=1) % 5)
    else:
        n = int(group[1:])
        perms = list(itertools.permutations(range(n)))
        if group.startswith("A"):
            perms = [p for p in perms if sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n)) % 2 == 0]
        for seq, labels in zip(batch.tokens, batch.targets):
            product = tuple(range(n))
            for g, label in zip(seq, labels):
                product = compose(product, perms[g])
                assert perms[label] == product
    np.testing.assert_array_equal(batch.difficulty[0], [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])


def test_group_sizes():
    assert [len(group_table(g)) for g in ("S3", "S4", "S5", "A5", "Z7")] == [6, 24, 120, 60, 7]


def evaluate_prefix(tokens, task):
    """Independent recursive-descent parser of the prefix expression."""
    inverse_ops = {v: k for k, v in task.op_ids.items()}
    pos = 0

    def parse():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok in inverse_ops:
            a, b = parse(), parse()
            return {"+": a + b, "-": a - b, "*": a * b}[inverse_ops[tok]]
        assert tok < task.cfg.modulus
        return tok

    value = parse()
    return value % task.cfg.modulus, pos


def test_arith_labels_by_independent_parser():
    task = ArithTask(ArithConfig(modulus=23, max_ops=6))
    batch = task.sample(np.random.default_rng(0), 300, "val")
    for seq, targets, difficulty in zip(batch.tokens.tolist(), batch.targets, batch.difficulty):
        assert seq[0] == task.bos
        n_ops = seq[1] - task.len_base + 1
        value, consumed = evaluate_prefix(seq[2:], task)
        ans_pos = 2 + consumed
        assert seq[ans_pos] == task.ans
        assert targets[ans_pos] == value
        assert (targets != IGNORE_INDEX).sum() == 1
        assert difficulty[ans_pos] == n_ops == sum(t in task.op_ids.values() for t in seq[2:ans_pos])
    assert set(np.unique(batch.difficulty[batch.difficulty > 0])) == set(range(1, 7))


def test_arith_curriculum_and_eval_ops():
    task = ArithTask(ArithConfig(modulus=5, max_ops=4, curriculum_steps=100))
    early = task.generate(np.random.default_rng(0), 200, "train", step=0)
    late = task.generate(np.random.default_rng(0), 200, "train", step=100)
    assert early.difficulty.max() == 1 and late.difficulty.max() == 4
    paper = ArithTask(ArithConfig(modulus=5, max_ops=4, eval_ops="max"))
    assert set(np.unique(paper.sample(np.random.default_rng(0), 50, "val").difficulty)) == {0, 4}


def test_registry():
    assert {"state", "arith"} <= set(TASKS)
    with pytest.raises(KeyError, match="registered tasks"):
        get_task("nope")


def test_too_small_example_space_fails_clearly():
    task = StateTask(StateConfig(group="Z2", length=1, buckets=1))  # 2 possible sequences
    splits = set(split_of(np.array([[0], [1]])).tolist())
    empty = next(name for i, name in enumerate(("train", "val", "test")) if i not in splits)
    with pytest.raises(RuntimeError, match="too small"):
        task.sample(np.random.default_rng(0), 10, empty)
