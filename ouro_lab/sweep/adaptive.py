"""The adaptive design over the trained loop count: which (T, seed) to train next so that the
saturation answer (T* per curve, with its interval) is known for the least compute, and when
to stop. Pure: observations in, a decision out (the next point, why, and the answer so far);
the same observations and seed give the same decision, so a resumed study asks for the same
next point.

The answer, per curve (the objective at one difficulty level): the saturation point T* of the
seed means over the candidate T's (`saturation.saturation_point`) and its distribution, from a
parametric bootstrap with common random numbers:
  - a trained T's mean is drawn as ybar_T + s / sqrt(n_T) * t_df, s the seed noise pooled over
    the T's with two or more seeds (df its degrees of freedom), so one seed at a T still has an
    interval, a wide one while few seeds are in;
  - a T not trained yet is predicted from its trained neighbours: by the law
    (`saturation.fit_law`, when it fits the trained means: 4+ T's, R² >= 0.9, no turn back),
    else by linear interpolation, plus the spread of a value anywhere between the neighbours
    (|y_b - y_a| / sqrt(12));
  - a T above the largest trained one: on the metric's own scale (bits per byte, a loss) it
    cannot be predicted, so the start trains the largest candidate; an accuracy is bounded by
    1 (an error rate, minimized, by 0), so there it is drawn uniformly between the largest
    trained T's draw and that bound (`bound`): a T whose accuracy is within epsilon of 1 needs
    no larger T to show that it is saturated, and one that is not leaves room for a gain, which
    the design then trains a larger T to see.
The uncertainty is the entropy of T*'s bootstrap distribution (over the candidates and "not
saturated"), summed over curves. The next point is the one whose expected entropy after
training it (its outcome drawn from its predictive distribution) is lowest per unit of cost
(training FLOPs: a looped run costs in proportion to T). The study stops when every curve's
central `level` interval of T* is at most `tolerance` steps of the candidate list wide (T=4
to T=6 of [1, 2, 4, 6, 8] is one step; "not saturated" counts as one past the last) and rests
on trained T's (each T in it and the one below it trained at least once: a prediction cannot
see a step), when the budget is spent, or when no point is left (every T at `max_seeds`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

import numpy as np
from scipy import special

from ouro_lab.saturation import MIN_R2, LawFit, fit_law, law, saturation_points


_CLIP = 1e-4  # an accuracy of 0 or 1 is taken as this far inside (0, 1) on the logit scale


def _logit(p):
    p = np.clip(p, _CLIP, 1 - _CLIP)
    return np.log(p / (1 - p))


def _expit(x):
    return 1 / (1 + np.exp(-x))


# where the seed noise is modelled: "raw" (the metric's own scale: bits per byte, a loss) or
# "logit" (an accuracy: its seed noise shrinks towards 0 and 1, 0.1 at T=2 and 0.0005 at a
# saturated T=6 in the loops study, and is about even on the logit scale)
SCALES = {"raw": (lambda v: v, lambda v: v), "logit": (_logit, _expit)}
LAW_REACH = 2.0  # the law's "within epsilon by" is reported up to this many times the largest candidate T


@dataclass(frozen=True, order=True)
class Point:
    """One run of the design: trained loop count and seed index (0, 1, ...)."""

    loops: int
    seed: int


@dataclass
class CurveAnswer:
    """T* of one curve: the seed-means point, its central interval (math.inf = not saturated
    within the candidates), its bootstrap distribution, and the law's loops to within epsilon."""

    point: float
    low: float
    high: float
    probs: dict[float, float]
    entropy: float
    law_loops: float = math.nan  # the law's loops to within epsilon (nan: no fit; inf: past LAW_REACH x the largest T)
    steps: int = 0  # the interval's width in steps of the candidate list ("not saturated" = one past the last)

    def __str__(self) -> str:
        def t(v: float) -> str:
            return "not saturated" if math.isinf(v) else f"T={v:g}"

        law = (f"; law: within epsilon by {self.law_loops:.1f}" if math.isfinite(self.law_loops)
               else "; law: not within epsilon by twice the largest T" if math.isinf(self.law_loops) else "")
        return f"{t(self.point)} [{t(self.low)}, {t(self.high)}]{law}"


@dataclass
class Decision:
    """What the design asks for next (`point` None: stop), why, and the answer so far."""

    point: Point | None
    reason: str
    answers: dict[str, CurveAnswer]
    scores: dict[Point, float] = field(default_factory=dict)  # expected entropy drop per unit cost
    spent: float = 0.0  # cost of the points trained so far


def bound(scale: str, direction: str) -> float | None:
    """The best value the objective can take, where the design may use it: an objective on the
    logit scale is a probability, so an accuracy (maximized) cannot pass 1 and an error rate
    (minimized) cannot pass 0; None on the metric's own scale."""
    return (1.0 if direction == "maximize" else 0.0) if scale == "logit" else None


def start_points(candidates: Sequence[int], max_seeds: int = 2, bounded: bool = False) -> list[Point]:
    """The coarse start: the smallest, middle and (unless the objective is `bounded`, see
    `bound`) largest T at seed 0, and (`max_seeds` > 1) a second seed at the middle one, so the
    seed noise is measured from the first decision on. A bounded objective does not need the
    largest T trained up front: a larger T is trained only while the bound leaves room for a
    gain of epsilon (the largest T is 1/3 of a grid seed's cost in [1, 2, 3, 4, 6, 8])."""
    ts = sorted(candidates)
    mid = ts[len(ts) // 2]
    coarse = list(dict.fromkeys([ts[0], mid] if bounded else [ts[0], mid, ts[-1]]))
    return [Point(t, 0) for t in coarse] + ([Point(mid, 1)] if max_seeds > 1 else [])


def decide(observations: Mapping[Point, Mapping[str, float]], candidates: Sequence[int], *, epsilon: float,
           direction: str = "maximize", tolerance: float = 1.0, level: float = 0.9, max_seeds: int = 3,
           cost: Mapping[int, float] | None = None, budget: float = math.inf, n_boot: int = 400,
           n_outcomes: int = 8, seed: int = 0, pending: Collection[Point] = (),
           failed: Collection[Point] = (), scale: str = "raw", confirm: int = 2) -> Decision:
    """The next point of the design, given the finished points' objective values per curve
    ({Point(4, 0): {"d1": 0.93, "d2": 0.71}, ...}). `cost`: each T's cost (default T);
    `budget`: stop once the trained points' cost reaches it; `pending`: points being trained
    (by other workers): never asked again, and waited for before the answer is called known;
    `failed`: points that crashed or were stopped: never asked again; `scale`: where the seed
    noise is modelled, "raw" or "logit" (an accuracy: see `SCALES`); `confirm`: seeds at each
    answer's T and the one below it before the answer is called known."""
    ts = sorted(candidates)
    cost = {t: float(cost[t]) if cost else float(t) for t in ts}
    spent = sum(cost[p.loops] for p in observations)
    values, fits = _curves(observations, direction)
    curves = sorted(values)
    answers = {c: _answer(values[c], fits[c], ts, epsilon, direction, level, n_boot, seed, scale) for c in curves}
    taken = set(observations) | set(pending) | set(failed)
    start = start_points(ts, max_seeds, bounded=bound(scale, direction) is not None)
    missing = [p for p in start if p not in taken]
    if missing:
        return Decision(missing[0], "start: the coarse T's and a second seed at the middle one", answers, spent=spent)
    if spent >= budget:
        return Decision(None, f"budget spent ({spent:g} of {budget:g})", answers, spent=spent)
    allowed = _allowed(taken, ts, max_seeds)
    waiting = [p for p in start if p in pending]
    if not curves or waiting:  # the start is still training elsewhere: the cheapest point left meanwhile
        if not allowed:
            return Decision(None, "no point left", answers, spent=spent)
        best = min(allowed, key=lambda p: (cost[p.loops], p))
        return Decision(best, f"T={best.loops} seed {best.seed}: the start is still training "
                        f"({', '.join(f'T={p.loops} seed {p.seed}' for p in waiting) or 'no result yet'})",
                        answers, spent=spent)
    if all(a.steps <= tolerance for a in answers.values()):
        # NOTE: an untrained T is only predicted from its neighbours; a step there (a plateau,
        # then a gain) is invisible to the prediction, so the answer must rest on trained T's;
        # and one seed at the answer's T or the one below it can be an outlier the pooled noise
        # cannot see (seeds at T=2 gave 0.73, 0.96 and 1.00 on one level of the loops study):
        # there it rests on `confirm` seeds
        need: dict[int, int] = {}
        for a in answers.values():
            for t in _support(a, ts):
                need[t] = max(need.get(t, 0), 1)
            for t in _boundary(a, ts):
                need[t] = max(need.get(t, 0), min(confirm, max_seeds))
        have = {t: sum(p.loops == t for p in observations) for t in ts}
        short = sorted(t for t in need if have[t] < need[t])
        if not short:  # (points still training elsewhere finish, and join the answer's report)
            return Decision(None, f"answer known: every interval within {tolerance:g} step(s) of the candidates",
                            answers, spent=spent)
        asks = [p for p in allowed if p.loops in short]
        if asks:
            p = min(asks, key=lambda p: (p.seed, cost[p.loops], p.loops))
            why = "it is not trained yet" if p.seed == 0 else f"it is the answer's T or the one below, at {have[p.loops]} seed(s)"
            return Decision(p, f"T={p.loops} seed {p.seed}: the answer rests on it and {why}", answers, spent=spent)
        # (the T's it rests on are training elsewhere: meanwhile, the best point as below)
    if not allowed:
        return Decision(None, f"no point left (every T at {max_seeds} seeds)", answers, spent=spent)
    now = sum(a.entropy for a in answers.values())
    scores = {}
    for p in allowed:
        after = sum(_expected_entropy(values[c], fits[c], p, ts, epsilon, direction, n_boot, n_outcomes, seed, scale)
                    for c in curves)
        scores[p] = (now - after) / cost[p.loops]
    best = max(sorted(scores), key=lambda p: scores[p])  # (ties: the smaller T, then seed)
    unsettled = ", ".join(f"{c} {a}" for c, a in answers.items() if a.steps > tolerance)
    reason = (f"T={best.loops} seed {best.seed}: expected entropy drop {scores[best] * cost[best.loops]:.3f} "
              f"nats for cost {cost[best.loops]:g} (unsettled: {unsettled})")
    return Decision(best, reason, answers, scores, spent)


def answers_of(observations: Mapping[Point, Mapping[str, float]], candidates: Sequence[int], *, epsilon: float,
               direction: str = "maximize", level: float = 0.9, n_boot: int = 400,
               seed: int = 0, scale: str = "raw") -> dict[str, CurveAnswer]:
    """The answer per curve from these observations (what `decide` reports, without choosing a point)."""
    ts = sorted(candidates)
    values, fits = _curves(observations, direction)
    return {c: _answer(values[c], fits[c], ts, epsilon, direction, level, n_boot, seed, scale) for c in sorted(values)}


def same_answer(a: Mapping[str, CurveAnswer], b: Mapping[str, CurveAnswer]) -> bool:
    """The same T* point and interval on every curve."""
    return a.keys() == b.keys() and all((a[c].point, a[c].low, a[c].high) == (b[c].point, b[c].low, b[c].high)
                                        for c in a)


def can_change(observations: Mapping[Point, Mapping[str, float]], point: Point, low: Mapping[str, float],
               high: Mapping[str, float], candidates: Sequence[int], **settings) -> bool:
    """The stopping rule: can the run at `point`, whose final value per curve lies in
    [low, high], change the answer? It cannot when the answer without it, with it at its low
    end and with it at its high end are the same (T* and interval on every curve): then
    finishing it buys nothing the answer shows, and it is stopped. `settings`: `answers_of`'s."""
    if point in observations:
        return True  # (a finished point is not this rule's business)
    without = answers_of(observations, candidates, **settings)
    for end in (low, high):
        if not same_answer(without, answers_of({**observations, point: end}, candidates, **settings)):
            return True
    return False


def final_bounds(now: Mapping[str, float], step: int, finished: Sequence[tuple[int, Mapping[str, Mapping[str, float]]]],
                 loops: int, candidates: Sequence[int], margin: float = 1.0) -> tuple[dict[str, float], dict[str, float]] | None:
    """Bounds on a running run's final value per curve, from the learning curves of the finished
    runs at its T and the neighbouring candidates (`finished`: (T, {step: {curve: value}}), the
    last step the final value): its value `now` at `step`, less the largest drop and plus the
    largest gain any of them made from that step to its end, times `margin`. None while no such
    run has a value at this step (nothing to extrapolate from)."""
    ts = sorted(candidates)
    near = {t for t in ts if abs(ts.index(t) - ts.index(loops)) <= 1} if loops in ts else {loops}
    low, high = {}, {}
    for curve, value in now.items():
        changes = []
        for t, history in finished:
            if t not in near or str(step) not in history or not history:
                continue
            last = history[max(history, key=int)]
            if curve in last and curve in history[str(step)]:
                changes.append(last[curve] - history[str(step)][curve])
        if not changes:
            return None
        low[curve] = value - margin * max(0.0, -min(changes))
        high[curve] = value + margin * max(0.0, max(changes))
    return (low, high) if now else None


def _curves(observations: Mapping[Point, Mapping[str, float]],
            direction: str) -> tuple[dict[str, dict[int, list[float]]], dict[str, LawFit | None]]:
    """Each curve's {T: [value per seed]} and its law fit (once per decision: a least-squares solve each)."""
    curves = sorted({c for values in observations.values() for c, v in values.items() if math.isfinite(v)})
    values = {c: _curve(observations, c) for c in curves}
    return values, {c: _law(values[c], direction) for c in curves}


def _boundary(answer: CurveAnswer, ts: Sequence[int]) -> list[int]:
    """The answer's T and the one just below it (for "not saturated": the largest T and the one
    below): where one outlying seed would move the answer."""
    at = [t for t in ts if t <= answer.point]
    return at[-2:]


def _support(answer: CurveAnswer, ts: Sequence[int]) -> list[int]:
    """The candidates an answer rests on: every T in its interval and the one just below it
    (which must be shown to fall short by epsilon)."""
    inside = [t for t in ts if answer.low <= t <= answer.high]
    below = [t for t in ts if t < answer.low]
    return inside + below[-1:]


def _curve(observations: Mapping[Point, Mapping[str, float]], curve: str) -> dict[int, list[float]]:
    """{T: [value per seed]} of one curve, finite values only."""
    values: dict[int, list[float]] = {}
    for p in sorted(observations):
        v = observations[p].get(curve, math.nan)
        if math.isfinite(v):
            values.setdefault(p.loops, []).append(float(v))
    return values


def _allowed(taken: Collection[Point], ts: Sequence[int], max_seeds: int) -> list[Point]:
    """For every candidate T with fewer than `max_seeds` points taken: its next seed."""
    seeds_of: dict[int, set[int]] = {}
    for p in taken:
        seeds_of.setdefault(p.loops, set()).add(p.seed)
    out = []
    for t in ts:
        seeds = seeds_of.get(t, set())
        if len(seeds) < max_seeds:
            out.append(Point(t, min(set(range(max_seeds)) - seeds)))
    return out


def _noise(values: Mapping[int, list[float]]) -> tuple[float, int]:
    """The seed noise pooled over the T's with two or more seeds, and its degrees of freedom.
    None such (the start always adds one): a weak guess of a twentieth of the curve's span."""
    ss = df = 0.0
    for v in values.values():
        if len(v) > 1:
            ss += float(np.var(v, ddof=1)) * (len(v) - 1)
            df += len(v) - 1
    if df:
        return max(math.sqrt(ss / df), 1e-9), int(df)
    means = [float(np.mean(v)) for v in values.values()]
    return max((max(means) - min(means)) / 20, 1e-9), 1


def _law(values: Mapping[int, list[float]], direction: str) -> LawFit | None:
    """The law fitted to a curve's trained means, when it fits (4+ T's, R² >= MIN_R2, no turn back)."""
    trained = sorted(values)
    if len(trained) < 4:
        return None
    fit = fit_law(trained, [float(np.mean(values[t])) for t in trained], direction)
    return fit if fit.ok and fit.r2 >= MIN_R2 else None


def _draws(values: Mapping[int, list[float]], ts: Sequence[int], fit: LawFit | None, n_boot: int,
           rng: np.random.Generator, scale: str = "raw", direction: str = "maximize") -> np.ndarray:
    """(n_boot, len(ts)) bootstrap means of every candidate T (see the module's docstring);
    `fit`: the law that predicts the untrained T's, or None (linear interpolation); `scale`:
    the means are drawn on that scale (`SCALES`) and returned on the metric's own."""
    best = bound(scale, direction)
    to, back = SCALES[scale]
    values = {t: [to(v) for v in vs] for t, vs in values.items()} if scale != "raw" else values
    trained = sorted(values)
    s, df = _noise(values)
    means = {t: float(np.mean(values[t])) for t in trained}
    out = np.empty((n_boot, len(ts)))
    t_draws = rng.standard_t(df, size=(n_boot, len(ts)))
    z = rng.standard_normal((n_boot, len(ts)))
    drawn = {}
    for j, t in enumerate(ts):
        if t in means:
            drawn[t] = means[t] + s / math.sqrt(len(values[t])) * t_draws[:, j]
            out[:, j] = drawn[t]
    for j, t in enumerate(ts):
        if t in means:
            continue
        lower = [u for u in trained if u < t]
        upper = [u for u in trained if u > t]
        if not upper:  # (unbounded: never beyond the largest trained T, the start trains the largest candidate)
            if best is None:
                out[:, j] = drawn[lower[-1]]
            else:  # anywhere from the largest trained T's draw up to the bound (z: its own CRN column)
                last = back(drawn[lower[-1]])
                out[:, j] = to(last + special.ndtr(z[:, j]) * (best - last))
            continue
        if not lower:
            out[:, j] = drawn[upper[0]]
            continue
        a, b = lower[-1], upper[0]
        w = (t - a) / (b - a)
        centre = to(float(law(t, fit.m_inf, fit.a, fit.k))) if fit else means[a] + w * (means[b] - means[a])
        shift = (drawn[a] + w * (drawn[b] - drawn[a])) - (means[a] + w * (means[b] - means[a]))
        out[:, j] = centre + shift + abs(means[b] - means[a]) / math.sqrt(12) * z[:, j]
    return out if scale == "raw" else back(out)


def _distribution(values: Mapping[int, list[float]], ts: Sequence[int], fit: LawFit | None, epsilon: float,
                  direction: str, n_boot: int, rng: np.random.Generator, scale: str = "raw") -> np.ndarray:
    """T* of every bootstrap draw (math.inf: not saturated within the candidates)."""
    return saturation_points(_draws(values, ts, fit, n_boot, rng, scale, direction), ts, epsilon, direction)


def _entropy(points: np.ndarray) -> float:
    return _entropy_of(np.unique(points, return_counts=True)[1])


def _entropy_of(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _rng(seed: int, *parts: object) -> np.random.Generator:
    """A generator fixed by the study seed and `parts`: common random numbers across the
    candidates of one decision, the same numbers for the same observations after a resume."""
    return np.random.default_rng([seed, zlib.crc32(repr(parts).encode())])


def _answer(values: Mapping[int, list[float]], fit: LawFit | None, ts: Sequence[int], epsilon: float, direction: str,
            level: float, n_boot: int, seed: int, scale: str = "raw") -> CurveAnswer:
    trained = sorted(values)
    means = [float(np.mean(values[t])) for t in trained]
    best = bound(scale, direction)
    if best is not None and trained[-1] < max(ts):  # (larger T's untrained: none passes the bound)
        point = float(saturation_points(np.asarray([means + [best]]), trained + [math.inf], epsilon, direction)[0])
    else:
        point = float(saturation_points(np.asarray([means]), trained, epsilon, direction)[0])
    boot = _distribution(values, ts, fit, epsilon, direction, n_boot, _rng(seed, "answer"), scale)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha], method="inverted_cdf")
    unique, counts = np.unique(boot, return_counts=True)
    law_loops = fit.loops_to_within(epsilon) if fit is not None else math.nan
    if law_loops > LAW_REACH * max(ts):  # (an extrapolation that far is no answer: inf, said as such)
        law_loops = math.inf
    index = {float(t): i for i, t in enumerate(ts)} | {math.inf: len(ts)}
    return CurveAnswer(point, float(low), float(high), dict(zip(unique.tolist(), (counts / n_boot).tolist())),
                       _entropy_of(counts), law_loops, index[float(high)] - index[float(low)])


def _expected_entropy(values: Mapping[int, list[float]], fit: LawFit | None, p: Point, ts: Sequence[int],
                      epsilon: float, direction: str, n_boot: int, n_outcomes: int, seed: int,
                      scale: str = "raw") -> float:
    """The entropy of T* after training `p`, averaged over `n_outcomes` outcomes drawn from the
    point's predictive distribution (a draw of its mean plus one seed's noise). `fit`: the law
    fitted now (NOTE: refitting it per outcome would cost a least-squares solve each)."""
    rng = _rng(seed, "outcomes", p.loops)
    j = list(ts).index(p.loops)
    to, back = SCALES[scale]
    s, _ = _noise({t: [to(v) for v in vs] for t, vs in values.items()})
    centres = to(_draws(values, ts, fit, n_outcomes, rng, scale, direction)[:, j])
    outcomes = back(centres + s * rng.standard_normal(n_outcomes))
    total = 0.0
    for y in outcomes:
        after = {t: list(v) for t, v in values.items()}
        after.setdefault(p.loops, []).append(float(y))
        total += _entropy(_distribution(after, ts, fit, epsilon, direction, n_boot, _rng(seed, "after"), scale))
    return total / n_outcomes
