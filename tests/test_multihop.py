"""`multihop`: determinism, splits, labels recomputed from the graph, bad input."""

import numpy as np
import pytest

from ouro_lab.config import ConfigError, load_config
from ouro_lab.data import SPLITS, split_of
from ouro_lab.data.multihop import MultihopConfig, MultihopTask
from ouro_lab.data import IGNORE_INDEX

CONTEXT = MultihopConfig(mode="context", width=4, depth=4, relations=2, hops=3, query_tokens=20)
MEMORISED = MultihopConfig(mode="memorised", width=6, depth=4, relations=3, hops=4, query_tokens=20)


def parse(task, tokens, graph=None):
    """Independent reading of one row: the facts (from the listed triples, or `graph`) and every
    query; returns [(question tuple, position, answer by walking the facts, hops)]."""
    c = task.cfg
    facts = {}
    if graph is None:
        context = tokens[: task.context_len].reshape(-1, 3)
        for src, rel, dst in context.tolist():
            assert (src, rel) not in facts
            facts[src, rel] = dst
    else:
        for layer in range(c.depth):
            for rel in range(c.relations):
                for i in range(c.width):
                    facts[layer * c.width + i, task.relation_base + rel] = (layer + 1) * c.width + graph[layer, rel, i]
    out, question, current = [], None, None
    for pos in range(task.context_len, len(tokens)):
        tok = int(tokens[pos])
        if tok == task.query_token:
            question = None
        elif question is None:
            question, current = (tok,), tok
        else:
            question += (tok,)
            current = facts[current, tok]
            out.append((question, pos, current, len(question) - 1))
    return out


@pytest.mark.parametrize("cfg", [CONTEXT, MEMORISED], ids=["context", "memorised"])
def test_deterministic_and_labels_recomputed_from_the_facts(cfg):
    task = MultihopTask(cfg)
    for split in SPLITS:
        a = task.sample(np.random.default_rng(5), 64, split)
        b = task.sample(np.random.default_rng(5), 64, split)
        c = task.sample(np.random.default_rng(6), 64, split)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.targets, b.targets)
        assert not np.array_equal(a.tokens, c.tokens)
        assert a.tokens.shape == (64, task.seq_len) and a.tokens.max() < task.vocab_size
        labelled = 0
        for tokens, targets, difficulty in zip(a.tokens, a.targets, a.difficulty):
            graph = task.graph if cfg.mode == "memorised" else None
            for question, pos, answer, hops in parse(task, tokens, graph):
                if targets[pos] != IGNORE_INDEX:
                    labelled += 1
                    assert targets[pos] == answer and difficulty[pos] == hops
                    # the answer lies `hops` layers past the start: never the start entity's layer
                    assert answer // cfg.width == question[0] // cfg.width + hops
            assert (difficulty[targets == IGNORE_INDEX] == 0).all()
        assert labelled > 64
        levels = set(np.unique(a.difficulty[a.difficulty > 0]).tolist())
        expected = task.difficulty_levels if split == "train" else task.eval_difficulty_levels
        assert levels == set(expected)
    assert task.eval_difficulty_levels == (list(range(2, cfg.hops + 1)) if cfg.mode == "memorised" else task.difficulty_levels)


def test_context_mode_rows_disjoint_across_splits():
    task = MultihopTask(CONTEXT)
    rows = {s: {tuple(r) for r in task.sample(np.random.default_rng(i), 400, s).tokens.tolist()}
            for i, s in enumerate(SPLITS)}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert (split_of(np.array(sorted(rows["test"]))) == 2).all()
    # every row lists a full graph: each (entity, relation) once
    batch = task.sample(np.random.default_rng(0), 8, "train")
    assert all(len({tuple(t) for t in row[: task.context_len].reshape(-1, 3)[:, :2].tolist()})
               == CONTEXT.depth * CONTEXT.relations * CONTEXT.width for row in batch.tokens)


def labelled_questions(task, batch):
    out = set()
    for tokens, targets in zip(batch.tokens, batch.targets):
        out |= {q for q, pos, _, _ in parse(task, tokens, task.graph) if targets[pos] != IGNORE_INDEX}
    return out


def test_memorised_mode_never_trains_on_a_held_out_question():
    task = MultihopTask(MEMORISED)
    train = labelled_questions(task, task.sample(np.random.default_rng(0), 3000, "train"))
    val = labelled_questions(task, task.sample(np.random.default_rng(1), 300, "val"))
    test = labelled_questions(task, task.sample(np.random.default_rng(2), 300, "test"))
    assert not train & val and not train & test and not val & test
    assert min(len(q) for q in val | test) == 3  # compositions only (start + >= 2 relations)
    # no held-out question extends a trained composition: it must be composed from facts
    assert not {q[:j] for q in val | test for j in range(3, len(q) + 1)} & train
    # every fact (1-hop question) is trained on: the held-out questions compose known facts
    facts = {q for q in train if len(q) == 2}
    assert len(facts) == MEMORISED.depth * MEMORISED.width * MEMORISED.relations
    # the graph is fixed by graph_seed, not by the sampling seed
    other = MultihopTask(MultihopConfig(**{**MEMORISED.__dict__, "graph_seed": 1}))
    assert not np.array_equal(task.graph, other.graph)
    np.testing.assert_array_equal(task.graph, MultihopTask(MEMORISED).graph)


def test_train_fraction_trains_on_fewer_compositions():
    full = MultihopTask(MEMORISED)
    half = MultihopTask(MultihopConfig(**{**MEMORISED.__dict__, "train_fraction": 0.5}))
    composed = [len({q for q in labelled_questions(t, t.sample(np.random.default_rng(0), 4000, "train")) if len(q) == 3})
                for t in (full, half)]
    n_two_hop = MEMORISED.width * (MEMORISED.depth - 1) * MEMORISED.relations ** 2
    assert composed[0] > 0.8 * n_two_hop
    assert 0.35 < composed[1] / composed[0] < 0.65, composed


@pytest.mark.parametrize("override,message", [
    ("data.multihop.hops=7", "data.multihop.hops: 7 hops need a graph at least that deep; data.multihop.depth is 6"),
    ("data.multihop.mode=open_book", "data.multihop.mode: 'open_book' is not one of: context, memorised"),
    ("data.multihop.width=1", "data.multihop.width: must be >= 2"),
    ("data.multihop.train_fraction=0", "data.multihop.train_fraction: must be in (0, 1]"),
])
def test_bad_multihop_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("conf/multihop.yaml", [override])
    assert message in str(err.value)


def test_graph_too_small_to_hold_out_is_refused():
    with pytest.raises(ConfigError, match="data.multihop.width: the graph has 3 two-hop questions and none falls in"):
        load_config("conf/multihop.yaml", ["data.multihop.width=3", "data.multihop.depth=2", "data.multihop.hops=2",
                                           "data.multihop.relations=1"])
    small = MultihopTask(MultihopConfig(mode="memorised", width=3, depth=2, hops=2, relations=1))
    with pytest.raises(RuntimeError, match="no val questions"):
        small.sample(np.random.default_rng(0), 4, "val")
