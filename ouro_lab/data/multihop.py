"""`multihop`: k-hop composition over a layered graph (docs/concepts/tasks.md "multihop").

Entities sit in `depth + 1` layers of `width` entities; each of `relations` relation types is
a random permutation from one layer to the next, so a question "the r3 of the r2 of the r1
of X" has one answer, always `k` layers after X. NOTE: layers are what make the task need
k hops: with a single set of entities and a random permutation in context, small models only
learnt "answer the start entity" (right whenever its cycle length divides k).
Here the answer is never in the start entity's layer, so the best shortcut is chance, 1/width.

A sequence is packed with queries `<q> X r1 r2 ... rk`, the label at r_j being the entity j
hops from X (every prefix of a query is itself a question), so difficulty = j = hop count.
Query lengths k are uniform in [1, hops], the start layer uniform among those that fit; the
last query of a row is cut where the row ends (its prefixes are still questions).

Two modes:
- `context`: every row has its own random graph, listed (shuffled) before the queries as
  triples `src r dst`; train/val/test are disjoint by a hash of the whole row.
- `memorised`: one fixed graph (`graph_seed`), nothing in context; the model must learn the
  facts (1-hop questions, all in training) and compose them. Multi-hop questions are split by
  a hash of their first two hops, so no val/test question is ever labelled in training and
  none extends a trained composition (with a per-question split, a 2-layer one-pass model
  answered held-out 4-hop questions at 0.76 by recalling the trained 3-hop prefix and adding
  one hop). NOTE: a held-out question's *suffix* (from its first intermediate entity on) is
  usually a trained question, so "one fact, then a memorised (k-1)-hop answer" remains a
  route; the per-k breakdown and the baselines show how far it carries.
  `train_fraction` trains on only part of the remaining compositions (fewer unique samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ouro_lab.data.base import IGNORE_INDEX, SPLITS, Batch, Task, prefix_hashes, register_task, split_of

MODES = ("context", "memorised")


@dataclass
class MultihopConfig:
    mode: str = "context"  # context: each row lists its own graph | memorised: one fixed graph learnt from facts
    width: int = 4  # entities per layer (chance = 1/width)
    depth: int = 4  # relation layers: entities in depth+1 layers, relations only between consecutive ones
    relations: int = 1  # relation types; each is a random permutation between consecutive layers
    hops: int = 4  # K: longest question; difficulty k = hops at a labelled position, 1..K (K <= depth)
    query_tokens: int = 24  # tokens of packed queries per row (after the graph in context mode)
    graph_seed: int = 0  # memorised mode: which fixed graph
    train_fraction: float = 1.0  # memorised mode: share of the non-held-out compositions (k >= 2) trained on


@register_task
class MultihopTask(Task):
    name = "multihop"
    Config = MultihopConfig
    difficulty_name = "hops"

    def __init__(self, cfg: MultihopConfig):
        super().__init__(cfg)
        n_entities = (cfg.depth + 1) * cfg.width
        # Vocabulary: entity (layer l, index i) = l * width + i, then relation tokens, then <q>.
        self.relation_base, self.query_token = n_entities, n_entities + cfg.relations
        self.graph = self.random_graphs(np.random.default_rng([cfg.graph_seed, 7]), 1)[0]  # memorised mode

    @classmethod
    def check_config(cls, cfg: MultihopConfig) -> list[tuple[str, str]]:
        problems = []
        if cfg.mode not in MODES:
            problems.append(("mode", f"{cfg.mode!r} is not one of: {', '.join(MODES)}"))
        for key, low in (("width", 2), ("depth", 1), ("relations", 1), ("hops", 1), ("query_tokens", 3)):
            if getattr(cfg, key) < low:
                problems.append((key, f"must be >= {low}, got {getattr(cfg, key)}"))
        if cfg.mode == "memorised" and cfg.hops < 2:
            problems.append(("hops", "memorised mode holds out compositions (k >= 2): needs hops >= 2"))
        if cfg.hops > cfg.depth >= 1:
            problems.append(("hops", f"{cfg.hops} hops need a graph at least that deep; data.multihop.depth "
                                     f"is {cfg.depth} (raise depth or lower hops)"))
        if not 0 < cfg.train_fraction <= 1:
            problems.append(("train_fraction", f"must be in (0, 1], got {cfg.train_fraction}"))
        if not problems and cfg.mode == "memorised":
            held = np.bincount(cls(cfg).two_hop_splits(), minlength=3)
            if held[1] == 0 or held[2] == 0:
                problems.append(("width", f"the graph has {held.sum()} two-hop questions and none falls in "
                                          f"{'val' if held[1] == 0 else 'test'} (5% each are held out); "
                                          "make it bigger (width, depth, relations)"))
        return problems

    def two_hop_splits(self) -> np.ndarray:
        """Split of every two-hop question (start entity, r1, r2): the split of all its extensions."""
        c = self.cfg
        layer, index, r1, r2 = (a.ravel() for a in np.meshgrid(
            np.arange(c.depth - 1), np.arange(c.width), np.arange(c.relations), np.arange(c.relations), indexing="ij"))
        questions = np.stack([self.entity(layer, index), r1 + self.relation_base, r2 + self.relation_base], 1)
        return _two_hop_split(questions)

    @property
    def vocab_size(self) -> int:
        return self.query_token + 1

    @property
    def context_len(self) -> int:
        c = self.cfg
        return 3 * c.depth * c.relations * c.width if c.mode == "context" else 0

    @property
    def seq_len(self) -> int:
        return self.context_len + self.cfg.query_tokens

    @property
    def difficulty_levels(self) -> list[int]:
        return list(range(1, self.cfg.hops + 1))

    @property
    def eval_difficulty_levels(self) -> list[int]:
        return self.difficulty_levels[1:] if self.cfg.mode == "memorised" else self.difficulty_levels  # facts are train-only

    def entity(self, layer, index):
        return layer * self.cfg.width + index

    def random_graphs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, depth, relations, width): graph[l, r, i] = index in layer l+1 of the r-relative of
        entity i of layer l (each relation a random permutation)."""
        c = self.cfg
        return rng.random((n, c.depth, c.relations, c.width)).argsort(-1)

    # --- generation -----------------------------------------------------------------------------
    def generate(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        """Context mode: n rows, each with its own graph (the base class splits rows by hash)."""
        graphs = self.random_graphs(rng, n)
        per_row = self._per_row()
        k, x, rel, answers = self._queries(rng, n * per_row, np.repeat(graphs, per_row, axis=0))
        rows = [self._pack(zip(*(a[i * per_row:(i + 1) * per_row] for a in (k, x, rel, answers))))
                for i in range(n)]
        context = self._context(rng, graphs)
        return Batch(*(np.concatenate([context_part, np.stack(part)], 1)
                       for context_part, part in zip(context, zip(*rows))))

    def sample(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        if self.cfg.mode == "context":
            return super().sample(rng, n, split, step)
        return self._sample_memorised(rng, n, split)

    def _sample_memorised(self, rng: np.random.Generator, n: int, split: str) -> Batch:
        """Rows of queries on the fixed graph; a position is labelled only if its question is in
        `split` (1-hop facts are all training; k >= 2 compositions split by a question hash)."""
        want = SPLITS.index(split)
        draw = n * self._per_row() * (1 if split == "train" else 4)  # held out: ~5% of questions kept

        def pool():
            for _ in range(10_000):
                k, x, rel, answers = self._queries(rng, draw, self.graph[None])
                question = np.concatenate([x[:, None], rel], 1)  # (Q, 1+K) start token, relation tokens
                q_split = _two_hop_split(question)[:, None]  # (Q, 1), the same for every k >= 2
                hops = np.arange(1, self.cfg.hops + 1)
                if split == "train":
                    keep = (q_split == want) & ((hops == 1) | (_fraction_hash(question) < self.cfg.train_fraction))
                    keep[:, 0] = True  # every fact is a training question
                else:
                    keep = (q_split == want) & (hops >= 2)
                keep &= hops <= k[:, None]
                answers = np.where(keep, answers, IGNORE_INDEX)
                # held-out rows hold only queries whose full question is in the split
                chosen = np.ones(len(k), bool) if split == "train" else keep[np.arange(len(k)), k - 1]
                yield from zip(k[chosen], x[chosen], rel[chosen], answers[chosen])
            raise RuntimeError(f"multihop: no {split} questions in this graph; make it bigger (width, depth, relations)")

        queries = pool()
        rows = [self._pack(queries) for _ in range(n)]
        return Batch(*(np.stack(part) for part in zip(*rows)))

    def _per_row(self) -> int:
        return self.cfg.query_tokens // 3 + 1  # the most queries a row can hold (shortest is 3 tokens)

    def _queries(self, rng: np.random.Generator, n: int, graphs: np.ndarray):
        """n random queries on `graphs` (1 or n graphs): hop count k (n,), start token x (n,),
        relation tokens (n, K) (all K drawn; only the first k are asked), answer tokens (n, K)."""
        c = self.cfg
        k = rng.integers(1, c.hops + 1, size=n)
        start_layer = (rng.random(n) * (c.depth - k + 1)).astype(np.int64)  # uniform in [0, depth - k]
        index = rng.integers(0, c.width, size=n)
        rel = rng.integers(0, c.relations, size=(n, c.hops))
        answers = np.empty((n, c.hops), dtype=np.int64)
        rows = np.arange(n) if len(graphs) == n else np.zeros(n, dtype=np.int64)
        current = index
        for j in range(c.hops):
            layer = np.minimum(start_layer + j, c.depth - 1)  # past k the walk is never read
            current = graphs[rows, layer, rel[:, j], current]
            answers[:, j] = self.entity(np.minimum(start_layer + j + 1, c.depth), current)
        return k, self.entity(start_layer, index), rel + self.relation_base, answers

    def _pack(self, queries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One row of `query_tokens` from (k, start, relations, answers) queries."""
        size = self.cfg.query_tokens
        tokens = np.empty(size, dtype=np.int64)
        targets = np.full(size, IGNORE_INDEX, dtype=np.int64)
        difficulty = np.zeros(size, dtype=np.int64)
        pos = 0
        while pos < size:
            k, start, rel, answers = next(queries)
            end = min(pos + 2 + k, size)
            tokens[pos:end] = np.concatenate([[self.query_token, start], rel[:k]])[: end - pos]
            labelled = max(0, end - pos - 2)  # a query cut after its start token has no label
            targets[pos + 2:end] = answers[:labelled]
            difficulty[pos + 2:end] = np.arange(1, labelled + 1)
            pos = end
        difficulty[targets == IGNORE_INDEX] = 0
        return tokens, targets, difficulty

    def _context(self, rng: np.random.Generator, graphs: np.ndarray):
        """The graphs as shuffled `src r dst` triples: tokens (n, context_len), no labels."""
        c = self.cfg
        n = len(graphs)
        layer, rel, index = (a.ravel() for a in np.meshgrid(
            np.arange(c.depth), np.arange(c.relations), np.arange(c.width), indexing="ij"))
        triples = np.stack([
            np.broadcast_to(self.entity(layer, index), (n, len(layer))),
            np.broadcast_to(rel + self.relation_base, (n, len(layer))),
            self.entity(layer + 1, graphs[:, layer, rel, index]),
        ], -1)  # (n, edges, 3)
        order = rng.random((n, len(layer))).argsort(-1)
        tokens = np.take_along_axis(triples, order[..., None], 1).reshape(n, -1)
        return tokens, np.full_like(tokens, IGNORE_INDEX), np.zeros_like(tokens)


def _two_hop_split(question: np.ndarray) -> np.ndarray:
    """(Q,) split of questions (start, r1, r2, ...) by their first two hops. NOTE: then no
    held-out question extends a trained composition (its suffix may be one; module docstring)."""
    return split_of(question[:, :3])


def _fraction_hash(question: np.ndarray) -> np.ndarray:
    """(Q, K) a uniform number in [0, 1) per question prefix, independent of the split hash."""
    h = prefix_hashes(question, start=0x9E3779B97F4A7C15, salt=0x51, shift=31)[:, 1:]
    return (h % np.uint64(1 << 20)).astype(np.float64) / (1 << 20)
