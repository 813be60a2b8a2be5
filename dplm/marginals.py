"""Binned one- and two-way counts of a table, and what dplm derives from them: the order the
model writes the columns in, the table's hard rules, and rows of a tree model over them.

The bins are public: they come from the schema alone (`ColumnBins`: a bin per category, per
small-range value, or between round edges of a number's or date's range), and the coarse
bins of the two-way tables are chosen from the released one-way counts. Without DP the counts
are exact. Under DP they are released by the Gaussian mechanism in rounds, each one step of
sampling rate 1 in the run's accountant (`noise_history`): every privacy unit contributes one
row (a random one of a subject's), which adds one to one cell of each table of a round, so a
round of T tables has L2 sensitivity sqrt(T) and noise multiplier z adds N(0, (z sqrt(T))^2)
to every cell. The rounds:

1. every column's one-way counts over its fine bins;
2. every pair of columns' two-way counts over coarse bins (chosen from round 1);
3. for each pair of number columns whose range may hold 0, the count of rows where both are not 0
   (one count a pair: exclusive pairs, such as a capital gain and a capital loss, are cheap
   to find this way, where the two-way tables' noise would hide them).

Everything derived from the noisy counts is post-processing: the column order
(`column_order`: strongly dependent columns close together, as DP training learns mostly
neighbouring columns), the rules (`Rules`: one-to-one and mutually exclusive pairs, which
sampling enforces), and rows drawn from a Chow-Liu tree over the noisy tables (`tree_rows`),
which a DP run may train on before its DP-SGD steps at no further privacy cost.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from dplm.privacy import integer_release, number_grid
from dplm.schema import Schema
from dplm.serialize import from_scaled, scaled_bounds, to_scaled_many

MAX_FINE_VALUES = 256  # a number or date column of at most this many values gets a bin per value (as value tokens)
FINE_BINS = 32  # equal-width fine bins of a wider range (with round edges added)
MAX_COARSE_BINS = 20
MIN_COARSE_BINS = 2
# Share of a pair's mutual information that DP training kept by the pair's distance in the
# generation order (issue 11's census run: neighbours 103 %, two or three apart 49 %, four to
# six 33 %, further 32 %): the weights `column_order` maximises.
RETENTION = {1: 1.0, 2: 0.5, 3: 0.5, 4: 0.33, 5: 0.33, 6: 0.33}
FAR_RETENTION = 0.3
RULE_SHARE = 0.99  # a one-to-one pair: this share of the visible mass on one partner per bin
EXCLUSIVE_SHARE = 0.02  # an exclusive pair: both non-zero at most this share of independence's count
RAKING_ROUNDS = 10  # passes over the columns when sampled rows are calibrated to the statistics
RAKING_LIMIT = 4.0  # the most one pass may raise or lower a row's weight


@dataclass
class ColumnBins:
    """One column's fine bins, from the schema alone: its categories, or [edges[i], edges[i+1])
    over the column's scaled integers (`serialize.scaled_bounds`), then a bin for missing values
    if the column is nullable. `coarse[f]` is the coarse bin of fine bin f (set from round 1)."""

    name: str
    kind: str
    nullable: bool
    categories: list[str] | None = None
    edges: list[int] | None = None
    coarse: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, col) -> ColumnBins:
        if col.kind == "categorical":
            return cls(col.name, col.kind, col.nullable, categories=list(col.categories))
        lo, hi = scaled_bounds(col)
        if hi - lo < MAX_FINE_VALUES:
            edges = list(range(lo, hi + 2))
        else:
            edges = set(np.linspace(lo, hi + 1, FINE_BINS + 1).round().astype(int).tolist())
            if col.kind != "datetime":  # round numbers (1, 1.2, 1.5, 2, ... x 10^e) and 0, 1 alone
                scaled = np.round(number_grid() * 10**col.precision)
                edges |= {int(e) for e in scaled if lo < e <= hi}
                edges |= {e for e in (0, 1) if lo < e <= hi}
            edges = sorted(edges)
        return cls(col.name, col.kind, col.nullable, edges=edges)

    @property
    def num_fine(self) -> int:
        values = len(self.categories) if self.categories is not None else len(self.edges) - 1
        return values + int(self.nullable)

    @property
    def num_coarse(self) -> int:
        return max(self.coarse) + 1

    def fine_index(self, values: pd.Series, col) -> np.ndarray:
        """The fine bin of each value (values outside the schema's: the nearest bin)."""
        missing = values.isna().to_numpy()
        out = np.full(len(values), self.num_fine - 1, dtype=np.int64)
        present = values[~missing]
        if self.categories is not None:
            lookup = {c: i for i, c in enumerate(self.categories)}
            idx = present.astype(str).map(lookup).fillna(0).to_numpy(dtype=np.int64)
        else:
            scaled = to_scaled_many(col, present)
            idx = np.clip(np.searchsorted(self.edges, scaled, side="right") - 1, 0, len(self.edges) - 2)
        out[~missing] = idx
        return out

    def single_values(self) -> bool:
        """Is every coarse bin one value (or the missing one)?"""
        return len(set(self.coarse)) == self.num_fine and (
            self.categories is not None or all(b == a + 1 for a, b in zip(self.edges[:-1], self.edges[1:])))

    def zero_bin(self) -> int | None:
        """The fine bin that holds exactly the value 0 (numbers whose range holds it), else None."""
        if self.edges is None or self.kind == "datetime" or 0 not in self.edges:
            return None
        i = self.edges.index(0)
        return i if i + 1 < len(self.edges) and self.edges[i + 1] == 1 else None

    def labels(self) -> list[str]:
        """Each fine bin as text, for statistics.json."""
        names = list(self.categories) if self.categories is not None else [
            str(a) if b == a + 1 else f"{a}..{b - 1}" for a, b in zip(self.edges[:-1], self.edges[1:])]
        return names + (["(missing)"] if self.nullable else [])


@dataclass
class Marginals:
    """The counts (exact, or noisy with std `noise[round]`) over `columns`' bins, for `units`
    privacy units. Keys of the two-way tables and exclusive counts are "a|b", a before b in
    `columns`' order."""

    columns: list[ColumnBins]
    units: int
    one_way: dict[str, list[float]]
    two_way: dict[str, list[list[float]]] = field(default_factory=dict)
    both_nonzero: dict[str, float] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=lambda: {"one_way": 0.0, "two_way": 0.0, "both_nonzero": 0.0})

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> ColumnBins:
        return self.columns[self.names.index(name)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Marginals:
        return cls(**{**d, "columns": [ColumnBins(**c) for c in d["columns"]]})

    # ---- derived (post-processing) --------------------------------------------------

    def coarse_one_way(self, name: str) -> np.ndarray:
        col = self.column(name)
        return np.bincount(col.coarse, weights=np.asarray(self.one_way[name]), minlength=col.num_coarse)

    def table(self, a: str, b: str, clip: bool = True) -> np.ndarray:
        """The two-way table of a x b (coarse bins), noisy counts clipped at 0 (or not)."""
        key = f"{a}|{b}" if f"{a}|{b}" in self.two_way else f"{b}|{a}"
        t = np.asarray(self.two_way[key], dtype=float)
        t = np.clip(t, 0, None) if clip else t
        return t if key.startswith(f"{a}|") else t.T

    def mutual_information(self, seed: int = 0) -> dict[tuple[str, str], float]:
        """Each pair's mutual information (nats) from its two-way table, less what noise alone
        would show: exact counts get the Miller-Madow correction, noisy ones lose the mean
        plug-in value of tables with the same margins and noise but independent columns."""
        rng = np.random.default_rng(seed)
        sigma = self.noise["two_way"]
        out = {}
        for key in self.two_way:
            a, b = key.split("|")
            t = self.table(a, b)
            if sigma == 0:
                nonzero = (t > 0).sum() - (t.sum(1) > 0).sum() - (t.sum(0) > 0).sum() + 1
                out[(a, b)] = max(0.0, _plugin_mi(t) - max(0, nonzero) / (2 * max(t.sum(), 1)))
                continue
            raw = self.table(a, b, clip=False)  # its margins are unbiased; the clipped table's are not
            rows, cols = np.clip(raw.sum(1), 0, None), np.clip(raw.sum(0), 0, None)
            independent = np.outer(rows, cols) / max(rows.sum(), 1.0)
            null = np.mean([_plugin_mi(np.clip(independent + rng.normal(0, sigma, t.shape), 0, None))
                            for _ in range(5)])
            out[(a, b)] = max(0.0, _plugin_mi(t) - null)
        return out

    def column_order(self, seed: int = 0) -> list[str]:
        """The columns in the order that maximises sum of MI(a, b) x RETENTION[distance]:
        a greedy chain (each next column the one most dependent on the last ones), then moves
        of single columns while any move raises the sum."""
        names, mi = self.names, self.mutual_information(seed)
        n = len(names)
        if n <= 2:
            return names
        w = np.zeros((n, n))
        for (a, b), v in mi.items():
            w[names.index(a), names.index(b)] = w[names.index(b), names.index(a)] = v
        weight = np.array([RETENTION.get(d, FAR_RETENTION) for d in range(n + 1)])

        def score(order):
            pos = np.empty(n, dtype=int)
            pos[order] = np.arange(n)
            return float((np.triu(w, 1) * weight[np.abs(pos[:, None] - pos[None, :])]).sum())

        start = int(np.argmax(w.sum(1)))
        order, left = [start], set(range(n)) - {start}
        while left:
            order.append(max(sorted(left), key=lambda j: sum(w[order[-d], j] * weight[d]
                                                               for d in range(1, min(len(order), 6) + 1))))
            left.discard(order[-1])
        best = score(order)
        improved = True
        while improved:
            improved = False
            for i in range(n):
                for j in range(n):
                    if i == j:
                        continue
                    trial = order[:i] + order[i + 1:]
                    trial.insert(j, order[i])
                    s = score(trial)
                    if s > best + 1e-12:
                        order, best, improved = trial, s, True
        return [names[i] for i in order]

    def rules(self) -> Rules:
        """The one-to-one and mutually exclusive pairs the counts show (see `Rules`)."""
        sigma1, sigma2, sigma3 = self.noise["one_way"], self.noise["two_way"], self.noise["both_nonzero"]

        def covers(name: str, bins: np.ndarray) -> bool:  # the bins outside the rule hold (near) nothing
            outside = np.delete(self.coarse_one_way(name), bins)
            return outside.sum() <= (1 - RULE_SHARE) * self.units + 4 * sigma1 * np.sqrt(len(outside))

        one_to_one = []
        for key in self.two_way:
            a, b = key.split("|")
            if not (self.column(a).single_values() and self.column(b).single_values()):
                continue  # merged bins hide what pairs with what: a rule between them would be made up
            t = self.table(a, b)
            # 4 sigma: a cell of pure noise passes with probability 3e-5, and one such cell in a
            # rare value's row or column would hide the rule (3 sigma: about one table in three).
            visible = np.where(t > 4 * sigma2, t, 0.0) if sigma2 else t
            mass = visible.sum()
            rows, cols = np.flatnonzero(visible.sum(1)), np.flatnonzero(visible.sum(0))
            # Noisy cells under the threshold are hidden: a pair of columns whose visible cells pair
            # up but whose hidden values hold real mass is no rule (German credit under DP).
            if mass < self.units / 2 or len(rows) < 2 or len(rows) != len(cols) or not (covers(a, rows) and
                                                                                         covers(b, cols)):
                continue
            partner_of_a = visible.argmax(1)
            if (visible.max(1).sum() >= RULE_SHARE * mass and visible.max(0).sum() >= RULE_SHARE * mass
                    and len(set(partner_of_a[rows].tolist())) == len(rows)):
                one_to_one.append({"columns": [a, b], "pairs": [[int(i), int(partner_of_a[i])] for i in rows]})
        exclusive = []
        for key, both in self.both_nonzero.items():
            a, b = key.split("|")
            if self.column(a).zero_bin() is None or self.column(b).zero_bin() is None:
                continue
            nonzero = {c: self.units - self.one_way[c][self.column(c).zero_bin()]
                       - (self.one_way[c][-1] if self.column(c).nullable else 0.0) for c in (a, b)}
            expected = max(nonzero[a], 0.0) * max(nonzero[b], 0.0) / max(self.units, 1)
            if expected >= max(20.0, 6 * sigma3) and both <= EXCLUSIVE_SHARE * expected + 2 * sigma3:
                exclusive.append({"columns": [a, b]})
        return Rules(self, one_to_one, exclusive)

    def tree_rows(self, n: int, schema: Schema, rng: np.random.Generator, rules: Rules | None = None) -> pd.DataFrame:
        """`n` rows drawn from the Chow-Liu tree (forest) over the noisy tables: each column's
        coarse bin given its parent's, its fine bin from the one-way counts within that, a
        value uniform within the fine bin; rows that break `rules` are drawn again."""
        mi = self.mutual_information()
        names = self.names
        parent = _max_spanning_forest(names, mi)
        order = _topological(names, parent)
        rows = {}
        while True:
            draw = self._tree_draw(n, order, parent, rng, schema)
            if rules is not None:
                draw = draw[rules.kept(draw, schema)]
            for name in names:
                rows.setdefault(name, []).extend(draw[name].tolist())
            if len(rows[names[0]]) >= n:
                break
        return pd.DataFrame({name: rows[name][:n] for name in names})

    def calibrated(self, rows: pd.DataFrame, schema: Schema, n: int, rng: np.random.Generator) -> pd.DataFrame:
        """`n` of `rows` (drawn from the model, more than `n`) chosen so that each column's coarse
        bins come near the statistics' one-way counts: raking weights (`RAKING_ROUNDS` passes over
        the columns, each factor within [1 / RAKING_LIMIT, RAKING_LIMIT]), then `n` distinct rows
        drawn with chances in proportion to their weights (`proportional_draw`). Post-processing of
        the model and the statistics: no epsilon."""
        margins = [(np.asarray(c.coarse)[c.fine_index(rows[c.name], schema[c.name])],
                    smoothed(self.coarse_one_way(c.name), self.noise["one_way"])) for c in self.columns]
        return rows.iloc[proportional_draw(raking_weights(margins), n, rng)].reset_index(drop=True)

    def _tree_draw(self, n: int, order: list[str], parent: dict, rng, schema: Schema) -> pd.DataFrame:
        coarse = {}
        for name in order:
            col = self.column(name)
            marginal = smoothed(self.coarse_one_way(name), self.noise["one_way"])
            if parent.get(name) is None:
                coarse[name] = rng.choice(col.num_coarse, size=n, p=marginal)
                continue
            t = self.table(parent[name], name)
            conditional = t + max(self.noise["two_way"], 1.0) * marginal[None, :]
            conditional /= conditional.sum(1, keepdims=True)
            u = rng.random(n)[:, None]
            coarse[name] = np.minimum((u > np.cumsum(conditional[coarse[parent[name]]], 1)).sum(1), col.num_coarse - 1)
        return pd.DataFrame({name: self._values(name, coarse[name], rng, schema[name]) for name in self.names})

    def _values(self, name: str, coarse: np.ndarray, rng, column) -> list:
        """A value for each row of coarse bin `coarse`: a fine bin by its noisy count, then a
        scaled integer uniform within it."""
        col = self.column(name)
        counts = np.clip(np.asarray(self.one_way[name], dtype=float), 0, None) + 1e-9
        fine = np.empty(len(coarse), dtype=np.int64)
        member = np.asarray(col.coarse)
        for c in np.unique(coarse):
            where = np.flatnonzero(coarse == c)
            options = np.flatnonzero(member == c)
            fine[where] = rng.choice(options, size=len(where), p=counts[options] / counts[options].sum())
        values = []
        for f in fine.tolist():
            if col.nullable and f == col.num_fine - 1:
                values.append(None)
            elif col.categories is not None:
                values.append(col.categories[f])
            else:
                values.append(from_scaled(column, int(rng.integers(col.edges[f], col.edges[f + 1]))))
        return values


def measure(df: pd.DataFrame, schema: Schema, units: list[list[int]], noise: dict[str, float] | None,
            rng=None, given: Schema | None = None, count: int | None = None) -> Marginals:
    """The marginals of `df` (typed by `schema`, as `coerce_table` returns it) over its
    non-text columns: exact with `noise=None`, else each round with its Gaussian noise
    multiplier (`noise["one_way"]`, `noise["two_way"]`, `noise["both_nonzero"]`), released as
    integers, and one random row per privacy unit (none for a unit without rows: a subject
    without events). Which tables a round holds depends on the `given` schema only (the user's,
    before any DP estimate: `statistics_rounds`); the coarse bins and `Marginals.units` on
    `count`, the public count of units (under DP their DP count; default: `units`' count).
    `rng` draws the rows and the noise (`privacy.secret_rng`)."""
    columns = [schema[name] for name in schema.names if schema[name].kind != "text"]
    bins = [ColumnBins.of(col) for col in columns]
    count = len(units) if count is None else count
    if noise is not None:  # one random row per unit: each unit adds one to one cell of each table
        picks = np.array([unit[rng.integers(len(unit))] for unit in units if unit], dtype=np.int64)
        df = df.iloc[picks]
    fine = fine_indexes(df, bins, columns)
    candidates = exclusive_candidates(given or schema)
    sizes = statistics_rounds(given or schema)
    sigma = {k: 0.0 if noise is None else noise[k] * math.sqrt(sizes[k]) for k in sizes}

    def noisy(counts: np.ndarray, k: str) -> np.ndarray:
        return counts if noise is None else integer_release(counts + rng.normal(0.0, sigma[k], size=counts.shape))

    # Round 1, then round 2 over coarse bins chosen from round 1's release, then round 3.
    one_way = {name: noisy(counts, "one_way") for name, counts in one_way_counts(fine, bins).items()}
    coarse_bins = coarse_bin_count(count, sigma["two_way"])
    for b in bins:
        b.coarse = _coarsen(b, one_way[b.name], coarse_bins)
    two_way = {key: noisy(counts, "two_way").tolist() for key, counts in two_way_counts(fine, bins).items()}
    both_nonzero = {key: float(noisy(np.array([n]), "both_nonzero")[0])
                    for key, n in both_nonzero_counts(df, candidates).items()}
    return Marginals(bins, count, {k: v.tolist() for k, v in one_way.items()}, two_way, both_nonzero, sigma)


def fine_indexes(df: pd.DataFrame, bins: list[ColumnBins], columns: list) -> dict[str, np.ndarray]:
    """Each row's fine bin of each column."""
    return {b.name: b.fine_index(df[b.name], col) for b, col in zip(bins, columns)}


def one_way_counts(fine: dict[str, np.ndarray], bins: list[ColumnBins]) -> dict[str, np.ndarray]:
    """Round 1: each column's rows per fine bin."""
    return {b.name: np.bincount(fine[b.name], minlength=b.num_fine).astype(float) for b in bins}


def two_way_counts(fine: dict[str, np.ndarray], bins: list[ColumnBins]) -> dict[str, np.ndarray]:
    """Round 2: each pair of columns' rows per pair of coarse bins (`ColumnBins.coarse` set)."""
    out = {}
    for a, b in itertools.combinations(bins, 2):
        ca, cb = np.asarray(a.coarse)[fine[a.name]], np.asarray(b.coarse)[fine[b.name]]
        counts = np.bincount(ca * b.num_coarse + cb, minlength=a.num_coarse * b.num_coarse).astype(float)
        out[f"{a.name}|{b.name}"] = counts.reshape(a.num_coarse, b.num_coarse)
    return out


def both_nonzero_counts(df: pd.DataFrame, candidates: list[str]) -> dict[str, float]:
    """Round 3: for each pair of `candidates`, the rows where both are present and not 0."""
    nonzero = {c: (df[c].notna() & (pd.to_numeric(df[c], errors="coerce").fillna(0) != 0)).to_numpy()
               for c in candidates}
    return {f"{a}|{b}": float((nonzero[a] & nonzero[b]).sum()) for a, b in itertools.combinations(candidates, 2)}


def exclusive_candidates(schema: Schema) -> list[str]:
    """The number columns whose range may hold 0 (given bounds around it, or bounds still to
    estimate): the columns of round 3, from the schema's kinds and given bounds alone."""
    def may_hold_zero(col):
        return col.min is None or col.max is None or float(col.min) <= 0 <= float(col.max)

    return [c.name for c in schema.columns if c.kind in ("integer", "float") and may_hold_zero(c)]


def statistics_rounds(schema: Schema) -> dict[str, int]:
    """Tables of each round (its L2 sensitivity squared), from the schema's kinds and given
    bounds alone: every non-text column, every pair of them, every pair of `exclusive_candidates`."""
    k = sum(c.kind != "text" for c in schema.columns)
    z = len(exclusive_candidates(schema))
    return {"one_way": k, "two_way": k * (k - 1) // 2, "both_nonzero": z * (z - 1) // 2}


def noise_history(noise: dict[str, float], schema: Schema) -> list[tuple[float, float, int]]:
    """The accountant's entries of the rounds that release something: (noise multiplier,
    sampling rate 1, one step)."""
    sizes = statistics_rounds(schema)
    return [(float(noise[k]), 1.0, 1) for k in ("one_way", "two_way", "both_nonzero") if sizes[k] and k in noise]


def coarse_bin_count(units: int, sigma: float) -> int:
    """Coarse bins per column for the two-way tables: about sqrt(units / max(10, sigma)), so a
    table's typical cell holds more than its noise (and ten rows without DP)."""
    return int(np.clip(math.floor(math.sqrt(units / max(10.0, sigma))), MIN_COARSE_BINS, MAX_COARSE_BINS))


def _coarsen(col: ColumnBins, counts, bins: int) -> list[int]:
    """Fine bin -> coarse bin from the (noisy) one-way counts: the `bins` - 1 most frequent
    categories and one for the rest; numbers in consecutive groups of about equal mass (a bin
    heavier than a group stays alone); the missing bin on its own."""
    counts = np.clip(np.asarray(counts, dtype=float), 0, None)
    values = col.num_fine - int(col.nullable)
    if values <= bins:
        coarse = list(range(values))
    elif col.categories is not None:
        top = set(np.argsort(-counts[:values], kind="stable")[: bins - 1].tolist())
        rank = {f: i for i, f in enumerate(sorted(top))}
        coarse = [rank.get(f, bins - 1) for f in range(values)]
    else:  # a fine bin joins the group its middle falls in: equal-mass groups, heavy bins alone
        mass = counts[:values]
        total = mass.sum() if mass.sum() > 0 else 1.0
        middle = (np.cumsum(mass) - mass / 2) / total
        groups = np.minimum(np.floor(middle * bins), bins - 1).astype(int)
        used = sorted(set(groups.tolist()))
        coarse = [used.index(g) for g in groups.tolist()]
    if col.nullable:
        coarse.append(max(coarse) + 1)
    return coarse


class Rules:
    """Pairs of columns whose values the table ties together, found in the marginals:
    * one-to-one: each value of `a` seen in the counts has one partner value of `b` and back
      (census: education and education_num; columns whose coarse bins are single values only);
      a row keeps the rule when its `b` is the partner of its `a` (and the reverse), for values
      with a known partner;
    * mutually exclusive: `a` and `b` are never both non-zero (a capital gain and a capital loss).
    Sampling redraws the rows that break a rule (`kept`)."""

    def __init__(self, marginals: Marginals, one_to_one: list[dict], exclusive: list[dict]):
        self.marginals = marginals
        self.one_to_one = one_to_one
        self.exclusive = exclusive

    def __bool__(self) -> bool:
        return bool(self.one_to_one or self.exclusive)

    def without(self, columns: list[str]) -> Rules:
        """The rules that tie at least one column not in `columns` (given columns' values are kept)."""
        def free(rule):
            return not set(rule["columns"]) <= set(columns)

        return Rules(self.marginals, [r for r in self.one_to_one if free(r)], [r for r in self.exclusive if free(r)])

    def to_dict(self) -> dict:
        """The rules, with each bin written as its values (for statistics.json)."""
        def label(name, coarse_bin):
            col = self.marginals.column(name)
            fine = [lbl for f, lbl in enumerate(col.labels()) if col.coarse[f] == coarse_bin]
            return fine[0] if len(fine) == 1 else f"{fine[0]} ... {fine[-1]}"

        return {"one_to_one": [{"columns": r["columns"], "pairs": [[label(r["columns"][0], i), label(r["columns"][1], j)]
                                                                    for i, j in r["pairs"]]} for r in self.one_to_one],
                "mutually_exclusive": [r["columns"] for r in self.exclusive]}

    def kept(self, df: pd.DataFrame, schema: Schema) -> np.ndarray:
        """Which rows of `df` (typed values) keep every rule."""
        ok = np.ones(len(df), dtype=bool)
        coarse = {}

        def bins_of(name):
            if name not in coarse:
                col = self.marginals.column(name)
                coarse[name] = np.asarray(col.coarse)[col.fine_index(df[name].reset_index(drop=True), schema[name])]
            return coarse[name]

        for rule in self.one_to_one:
            a, b = rule["columns"]
            forward = dict(map(tuple, rule["pairs"]))
            backward = {j: i for i, j in forward.items()}
            ba, bb = bins_of(a), bins_of(b)
            want_b = np.array([forward.get(int(i), -1) for i in ba])
            want_a = np.array([backward.get(int(j), -1) for j in bb])
            ok &= ((want_b < 0) | (want_b == bb)) & ((want_a < 0) | (want_a == ba))
        for rule in self.exclusive:
            a, b = rule["columns"]
            nonzero = [df[c].notna().to_numpy() & (pd.to_numeric(df[c], errors="coerce").fillna(0).to_numpy() != 0)
                       for c in (a, b)]
            ok &= ~(nonzero[0] & nonzero[1])
        return ok


def _plugin_mi(t: np.ndarray) -> float:
    total = t.sum()
    if total <= 0:
        return 0.0
    p = t / total
    outer = np.outer(p.sum(1), p.sum(0))
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def raking_weights(margins: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A weight per item that brings each margin's weighted shares near its target: `margins`
    holds (each item's bin, the target shares of the bins); `RAKING_ROUNDS` passes over the
    margins, each factor within [1 / RAKING_LIMIT, RAKING_LIMIT]."""
    weights = np.ones(len(margins[0][0]))
    for _ in range(RAKING_ROUNDS):
        for bins, target in margins:
            share = np.bincount(bins, weights=weights, minlength=len(target)) / weights.sum()
            weights *= np.clip(target / np.maximum(share, 1e-12), 1 / RAKING_LIMIT, RAKING_LIMIT)[bins]
    return weights


def proportional_draw(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct indexes, each drawn with a chance in proportion to its weight (capped at 1):
    systematic sampling over a random order (successive draws without replacement would favour
    the light rows once the heavy ones run out)."""
    chance = weights * n / weights.sum()
    while (chance > 1 + 1e-9).any():  # cap at 1, spread the rest over the others
        capped = chance >= 1
        chance[capped] = 1.0
        chance[~capped] *= (n - capped.sum()) / chance[~capped].sum()
    order = rng.permutation(len(weights))
    picks = np.searchsorted(np.cumsum(chance[order]), rng.random() + np.arange(n))
    return np.sort(order[np.minimum(picks, len(order) - 1)])


def smoothed(counts: np.ndarray, sigma: float) -> np.ndarray:
    """Noisy counts as shares: negatives to 0, a tenth of the noise's scale added to every bin."""
    p = np.clip(counts, 0, None) + max(sigma, 1e-9) * 0.1
    return p / p.sum()


def _max_spanning_forest(names: list[str], mi: dict) -> dict:
    """Each column's parent in a maximum spanning forest of the positive MIs (Kruskal);
    roots (None) are the first column of each tree in `names`' order."""
    group = {n: n for n in names}

    def find(x):
        while group[x] != x:
            group[x] = group[group[x]]
            x = group[x]
        return x

    edges = sorted(((v, a, b) for (a, b), v in mi.items() if v > 0), reverse=True)
    adjacent = {n: [] for n in names}
    for v, a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            group[ra] = rb
            adjacent[a].append(b)
            adjacent[b].append(a)
    parent, seen = {}, set()
    for root in names:
        if root in seen:
            continue
        parent[root], stack = None, [root]
        seen.add(root)
        while stack:
            node = stack.pop()
            for nxt in adjacent[node]:
                if nxt not in seen:
                    seen.add(nxt)
                    parent[nxt] = node
                    stack.append(nxt)
    return parent


def _topological(names: list[str], parent: dict) -> list[str]:
    order, placed = [], set()
    while len(order) < len(names):
        for n in names:
            if n not in placed and (parent[n] is None or parent[n] in placed):
                order.append(n)
                placed.add(n)
    return order
