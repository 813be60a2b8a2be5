"""Rules a table's owner declares in its schema (`rules:`), kept by construction.

A declared rule is public (the user's), so it costs no epsilon, and dplm never breaks it: a
column that others determine is not modelled at all but derived after sampling (the cheapest
form: no tokens), and a rule between modelled columns is a constraint the sampler's grammar
keeps at every token (`Constraint.domain`: the values a column may take given the columns
written before it), so no row is drawn and refused. The kinds:

    mapping:        {from: education, to: education_num, values: {Bachelors: 13, ...}}
                    `to` is determined by `from` (derived after sampling)
    one_to_one:     [education, education_num]
                    as mapping, the pairs read off the training rows (without DP only:
                    under DP give the mapping)
    combinations:   {columns: [relationship, sex], values: [[Husband, Male], [Wife, Female], ...]}
                    only the listed combinations occur
    exclusive:      [capital_gain, capital_loss]
                    never both present and non-zero
    inequality:     [end, ">=", start], or [capital_gain, "<=", 99999]
                    between two number or date columns, or a column and a constant

Within a subject's history (`data.subject`, histories), written in the first row only and
derived in the later ones (`histories.HistoryCodec`):

    constant:       [school, ethnicity]
                    one value per subject
    step:           {column: exper, per: year, size: 1}
                    `column` grows by `size` for each 1 of `per` (a number column of the rows,
                    usually `data.order_by`): experience +1 a year

`kept` says, for any table, which rows keep a rule, `kept_within` which subjects keep a rule of
their histories (the report counts them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dplm.errors import DplmError

ROW_KINDS = ("mapping", "one_to_one", "combinations", "exclusive", "inequality")
HISTORY_KINDS = ("constant", "step")
KINDS = ROW_KINDS + HISTORY_KINDS
OPERATORS = {">=": np.greater_equal, "<=": np.less_equal, ">": np.greater, "<": np.less}
FLIPPED = {">=": "<=", "<=": ">=", ">": "<", "<": ">"}


@dataclass
class Rule:
    """One declared rule: its kind, the columns it ties, and its parameters (see the module)."""

    kind: str
    columns: list[str]
    values: dict | list | None = None  # mapping: {from value: to value}; combinations: the allowed tuples
    operator: str | None = None  # inequality: columns[0] <op> columns[1] (or `bound`)
    bound: float | str | None = None  # inequality against a constant
    size: float | None = None  # step: the change of columns[0] for each 1 of columns[1]

    def to_dict(self) -> dict:
        if self.kind == "mapping":
            return {"mapping": {"from": self.columns[0], "to": self.columns[1], "values": self.values}}
        if self.kind == "combinations":
            return {"combinations": {"columns": self.columns, **({"values": self.values} if self.values else {})}}
        if self.kind == "inequality":
            return {"inequality": [self.columns[0], self.operator,
                                   self.columns[1] if len(self.columns) > 1 else self.bound]}
        if self.kind == "one_to_one" and self.values:
            return {"one_to_one": {"columns": list(self.columns), "values": self.values}}
        if self.kind == "step":
            return {"step": {"column": self.columns[0], "per": self.columns[1], "size": self.size}}
        return {self.kind: list(self.columns)}

    def describe(self) -> str:
        """The rule as one line of text."""
        if self.kind == "mapping":
            return f"{self.columns[1]} determined by {self.columns[0]}"
        if self.kind == "one_to_one":
            return f"{self.columns[0]} and {self.columns[1]} one-to-one"
        if self.kind == "combinations":
            return f"combinations of {', '.join(self.columns)}"
        if self.kind == "exclusive":
            return f"{' and '.join(self.columns)} never both non-zero"
        if self.kind == "constant":
            return f"{', '.join(self.columns)} constant within a subject"
        if self.kind == "step":
            return f"{self.columns[0]} grows by {self.size:g} per 1 of {self.columns[1]}"
        right = self.columns[1] if len(self.columns) > 1 else self.bound
        return f"{self.columns[0]} {self.operator} {right}"


def parse_rules(spec, names: list[str]) -> list[Rule]:
    """The `rules:` list of a schema file, checked against its column `names`; one-line errors."""
    if spec is None:
        return []
    if not isinstance(spec, list):
        raise DplmError("schema rules: expected a list of rules, e.g. '- exclusive: [capital_gain, capital_loss]'")
    return [_parse_rule(item, names) for item in spec]


def _parse_rule(item, names: list[str]) -> Rule:
    if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in KINDS:
        raise DplmError(f"schema rule {item!r}: give one of {', '.join(KINDS)} (see dplm/rules.py)")
    kind, body = next(iter(item.items()))
    if kind == "mapping":
        if not isinstance(body, dict) or {"from", "to", "values"} - set(body) or not isinstance(body["values"], dict):
            raise DplmError(f"schema rule mapping {body!r}: give from, to and values ({{from value: to value}})")
        rule = Rule(kind, [str(body["from"]), str(body["to"])], {str(k): v for k, v in body["values"].items()})
    elif kind == "combinations":
        if not isinstance(body, dict) or not isinstance(body.get("columns"), list) or len(body["columns"]) < 2:
            raise DplmError(f"schema rule combinations {body!r}: give columns (two or more) and values (the allowed "
                            "combinations)")
        values = body.get("values")
        if not values or any(not isinstance(v, list) or len(v) != len(body["columns"]) for v in values):
            raise DplmError(f"schema rule combinations of {body['columns']}: give values, a list of combinations of "
                            f"{len(body['columns'])} values each")
        rule = Rule(kind, [str(c) for c in body["columns"]], [[str(x) for x in v] for v in values])
    elif kind == "inequality":
        if not isinstance(body, list) or len(body) != 3 or body[1] not in OPERATORS:
            raise DplmError(f"schema rule inequality {body!r}: give [column, operator, column or number], the "
                            f"operator one of {', '.join(OPERATORS)}")
        left, op, right = body
        rule = Rule(kind, [str(left), str(right)], operator=op) if str(right) in names else \
            Rule(kind, [str(left)], operator=op, bound=right)
    elif kind == "constant":
        if not isinstance(body, list) or not body:
            raise DplmError(f"schema rule constant {body!r}: give the columns constant within a subject, e.g. [school]")
        rule = Rule(kind, [str(c) for c in body])
    elif kind == "step":
        if not isinstance(body, dict) or {"column", "per"} - set(body) or \
                not isinstance(body.get("size", 1), (int, float)) or body.get("size", 1) == 0:
            raise DplmError(f"schema rule step {body!r}: give column, per and size (a non-zero number), e.g. "
                            "{column: exper, per: year, size: 1}")
        rule = Rule(kind, [str(body["column"]), str(body["per"])], size=float(body.get("size", 1)))
    elif kind == "one_to_one" and isinstance(body, dict):  # as saved once its pairs are known
        if not isinstance(body.get("columns"), list) or len(body["columns"]) != 2 or not isinstance(body.get("values"), dict):
            raise DplmError(f"schema rule one_to_one {body!r}: give two columns, e.g. [a, b]")
        rule = Rule(kind, [str(c) for c in body["columns"]], {str(k): v for k, v in body["values"].items()})
    else:
        if not isinstance(body, list) or len(body) != 2:
            raise DplmError(f"schema rule {kind} {body!r}: give two columns, e.g. [a, b]")
        rule = Rule(kind, [str(c) for c in body])
    unknown = [c for c in rule.columns if c not in names]
    if unknown:
        raise DplmError(f"schema rule {kind}: column '{unknown[0]}' is not in the schema; choose from {names}")
    return rule


# ---- derived columns and constraints --------------------------------------------------------------

def derived_columns(rules: list[Rule]) -> dict[str, Rule]:
    """The columns a rule determines (mapping, one_to_one: the second column), not modelled."""
    return {rule.columns[1]: rule for rule in rules if rule.kind in ("mapping", "one_to_one")}


def derive(rows: pd.DataFrame, rules: list[Rule]) -> pd.DataFrame:
    """`rows` with each determined column computed from its rule's mapping (learned ones need
    `values` set: `learn_mappings`)."""
    out = rows.copy()
    for target, rule in derived_columns(rules).items():
        source = rule.columns[0]
        out[target] = out[source].map(lambda v: None if _missing(v) else rule.values.get(_key(v)))
    return out


def learn_mappings(rules: list[Rule], rows: pd.DataFrame | None) -> None:
    """Fill the pairs of each one_to_one rule that gives none with the most frequent partner of
    each value in the training `rows` (without DP). Under DP (`rows` None) a one-line error: the
    pairs would be read off private data, so the schema must give them (a mapping)."""
    for rule in rules:
        if rule.kind != "one_to_one" or rule.values:
            continue
        a, b = rule.columns
        if rows is None:
            raise DplmError(f"schema rule one_to_one [{a}, {b}]: under DP its pairs cannot be read off the data; "
                            f"declare it as a mapping (from: {a}, to: {b}, values: {{...}})")
        pairs = rows[[a, b]].dropna().astype(str).value_counts().reset_index()
        rule.values = {str(k): _typed_back(rows[b], v) for k, v in
                       pairs.drop_duplicates(a).set_index(a)[b].to_dict().items()}


def _typed_back(column: pd.Series, text: str):
    """A value of `column` from its text (a number column's values were read as numbers)."""
    return float(text) if pd.api.types.is_float_dtype(column) else int(float(text)) \
        if pd.api.types.is_numeric_dtype(column) else text


def _key(value) -> str:
    """A source value as a mapping's key: its text (whole numbers without a decimal point)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _nonzero(value) -> bool:
    """Present and not 0 (`True` for a value the grammar remembers as non-zero)."""
    return value is True or (value is not False and not _missing(value) and value != 0)


def _missing(value) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


@dataclass
class Domain:
    """The values a column may take given the columns written before it: scaled bounds (numbers,
    dates) and/or a set of allowed values (categories), and whether a missing value is allowed."""

    low: float = -math.inf
    high: float = math.inf
    values: frozenset | None = None
    missing: bool = True

    def allows(self, value) -> bool:
        if _missing(value):
            return self.missing
        if self.values is not None and _key(value) not in self.values:
            return False
        return not isinstance(value, (int, float)) or self.low <= value <= self.high

    def key(self) -> tuple:
        return (self.low, self.high, self.values, self.missing)


def row_rules(rules: list[Rule]) -> list[Rule]:
    """The rules each row keeps on its own (not those within a subject's history)."""
    return [r for r in rules if r.kind in ROW_KINDS]


def history_rules(rules: list[Rule]) -> list[Rule]:
    """The rules within a subject's history (constant, step)."""
    return [r for r in rules if r.kind in HISTORY_KINDS]


def constraints(rules: list[Rule]) -> Constraints:
    """The rules the grammar keeps (between modelled columns: not those that derive a column)."""
    return Constraints([r for r in rules if r.kind in ("combinations", "exclusive", "inequality")])


def broken(rules: list[Rule], rows: pd.DataFrame) -> tuple[Rule, int] | None:
    """The first rule a row of `rows` breaks, and that row's position; None if all keep all.
    Rules over columns `rows` lacks are not checked."""
    for rule in rules:
        if not set(rule.columns) <= set(rows.columns):
            continue
        ok = kept(rule, rows)
        if not ok.all():
            return rule, int(np.flatnonzero(~ok)[0])
    return None


def kept_all(rules: list[Rule], rows: pd.DataFrame) -> np.ndarray:
    """Which rows of `rows` keep every rule."""
    ok = np.ones(len(rows), dtype=bool)
    for rule in rules:
        ok &= kept(rule, rows)
    return ok


def mended(rows: pd.DataFrame, rules: list[Rule], rng: np.random.Generator) -> pd.DataFrame:
    """Random records (`schema.random_records`) changed to keep the constraints between their
    columns: of two exclusive values one set to 0 at random, listed combinations drawn among
    the listed ones, a value outside a constant bound set to it, two columns of an inequality
    swapped. Rows still breaking a rule (a swap that breaks another) are left for the caller."""
    out = rows.copy()
    for rule in constraints(rules).rules:
        bad = ~kept(rule, out)
        if not bad.any():
            continue
        if rule.kind == "exclusive":
            zeroed = np.where(rng.random(int(bad.sum())) < 0.5, rule.columns[0], rule.columns[1])
            for i, column in zip(np.flatnonzero(bad), zeroed):
                out.iloc[i, out.columns.get_loc(column)] = 0
        elif rule.kind == "combinations":
            picks = rng.integers(0, len(rule.values), int(bad.sum()))
            for i, pick in zip(np.flatnonzero(bad), picks):
                for column, value in zip(rule.columns, rule.values[pick]):
                    out.iloc[i, out.columns.get_loc(column)] = value
        elif len(rule.columns) == 1:
            out.loc[bad, rule.columns[0]] = _constant_like(out[rule.columns[0]], rule.bound)
        else:
            a, b = rule.columns
            out.loc[bad, [a, b]] = out.loc[bad, [b, a]].to_numpy()
    return out


@dataclass
class Constraints:
    """The declared rules between modelled columns, as the grammar keeps them: `reads` are the
    columns whose written values later columns' domains depend on (the grammar's memory)."""

    rules: list[Rule] = field(default_factory=list)

    @property
    def reads(self) -> list[str]:
        return sorted({c for rule in self.rules for c in rule.columns})

    def __bool__(self) -> bool:
        return bool(self.rules)

    def remembered(self, column: str, value):
        """What the grammar keeps of a written value: whether it is non-zero for a column only
        exclusive rules read (two states, not one per value), else the value."""
        if all(rule.kind == "exclusive" for rule in self.rules if column in rule.columns):
            return _nonzero(value)
        return value

    def domain(self, column: str, written: dict, scale) -> Domain | None:
        """The domain of `column` given the `written` values of earlier columns (typed values,
        None for missing; columns not yet written absent). `scale(name, value)` turns a number
        or date into its column's scaled integer. None: anything its schema allows."""
        out = Domain()
        limited = False
        for rule in self.rules:
            if column not in rule.columns:
                continue
            others = [c for c in rule.columns if c != column]
            if rule.kind == "exclusive":
                other = others[0]
                if other in written and _nonzero(written[other]):
                    out.low, out.high, limited = max(out.low, scale(column, 0)), min(out.high, scale(column, 0)), True
            elif rule.kind == "inequality" and len(rule.columns) == 2:
                other = others[0]
                if other in written and not _missing(written[other]):
                    op = rule.operator if rule.columns[0] == column else FLIPPED[rule.operator]
                    bound = scale(column, written[other])
                    strict = 1 if op in (">", "<") else 0
                    if op in (">=", ">"):
                        out.low = max(out.low, bound + strict)
                    else:
                        out.high = min(out.high, bound - strict)
                    limited = True
            elif rule.kind == "inequality":
                bound = scale(column, rule.bound)
                strict = 1 if rule.operator in (">", "<") else 0
                if rule.operator in (">=", ">"):
                    out.low = max(out.low, bound + strict)
                else:
                    out.high = min(out.high, bound - strict)
                limited = True
            elif rule.kind == "combinations":
                position = rule.columns.index(column)
                allowed = {tuple(v)[position] for v in rule.values
                           if all(_key(written[c]) == v[i] for i, c in enumerate(rule.columns)
                                  if c != column and c in written and not _missing(written[c]))}
                out.values = frozenset(allowed) if out.values is None else out.values & frozenset(allowed)
                limited = True
        return out if limited else None


def kept_shares(rules: list[Rule], holdout: pd.DataFrame, synthetic: pd.DataFrame) -> dict:
    """Per declared rule, the share of synthetic and of holdout rows that keep it (the report's)."""
    out = {"rules": [r.describe() for r in rules]}
    for name, rows in (("synthetic", synthetic), ("holdout", holdout)):
        kept_rows = [kept(r, rows) for r in rules]
        out[name] = {"per_rule": [float(k.mean()) for k in kept_rows],
                     "all_rules": float(np.logical_and.reduce(kept_rows).mean())}
    return out


def suggested(found: dict, declared: list[Rule]) -> list[dict]:
    """The rules the table's statistics show (`marginals.Rules.to_dict`: exact without DP, noisy
    under DP) that the schema does not declare, written as `rules:` entries to declare: a
    one-to-one pair as a mapping (where each bin is one value), exclusive numbers as exclusive."""
    tied = [set(r.columns) for r in declared]
    out = []
    for pair in found.get("one_to_one", []):
        a, b = pair["columns"]
        if {a, b} not in tied and not any(" ... " in str(x) + str(y) for x, y in pair["pairs"]):
            out.append({"mapping": {"from": a, "to": b, "values": {str(x): y for x, y in pair["pairs"]}}})
    out += [{"exclusive": list(columns)} for columns in found.get("mutually_exclusive", []) if set(columns) not in tied]
    return out


def kept(rule: Rule, rows: pd.DataFrame) -> np.ndarray:
    """Which rows of `rows` (typed values) keep `rule` (a missing value keeps every rule). One
    row keeps every rule within a history (`kept_within` checks subjects)."""
    if rule.kind in HISTORY_KINDS:
        return np.ones(len(rows), dtype=bool)
    if rule.kind in ("mapping", "one_to_one"):
        a, b = rule.columns
        if not rule.values:
            return np.ones(len(rows), dtype=bool)
        expected = rows[a].map(lambda v: None if _missing(v) else rule.values.get(_key(v)))
        return np.array([_missing(e) or same_value(e, v) for e, v in zip(expected, rows[b])], dtype=bool)
    if rule.kind == "exclusive":
        nonzero = [rows[c].notna().to_numpy() & (pd.to_numeric(rows[c], errors="coerce").fillna(0).to_numpy() != 0)
                   for c in rule.columns]
        return ~(nonzero[0] & nonzero[1])
    if rule.kind == "combinations":
        allowed = {tuple(v) for v in rule.values}
        return np.array([any(_missing(x) for x in row) or tuple(_key(x) for x in row) in allowed
                         for row in rows[rule.columns].itertuples(index=False, name=None)], dtype=bool)
    left = rows[rule.columns[0]]
    right = rows[rule.columns[1]] if len(rule.columns) > 1 else _constant_like(left, rule.bound)
    present = left.notna().to_numpy() & (right.notna().to_numpy() if isinstance(right, pd.Series) else True)
    compared = OPERATORS[rule.operator](np.asarray(_comparable(left)), np.asarray(_comparable(right)))
    return ~present | compared


def kept_within(rule: Rule, rows: pd.DataFrame, owners) -> pd.Series:
    """Per subject (the values of `owners`, one per row of `rows`), whether its rows keep a
    rule within a history: each constant column has one value (missing counts as one), a step
    column minus `size` x its `per` column has one value."""
    owners = pd.Series(np.asarray(owners), index=rows.index)
    if rule.kind == "constant":
        distinct = [rows[c].groupby(owners, sort=False).nunique(dropna=False) for c in rule.columns]
        return pd.concat(distinct, axis=1).max(axis=1) <= 1
    column, per = rule.columns
    offset = (pd.to_numeric(rows[column], errors="coerce") - rule.size * pd.to_numeric(rows[per], errors="coerce"))
    return offset.round(6).groupby(owners, sort=False).nunique(dropna=False) <= 1


def broken_within(rules: list[Rule], rows: pd.DataFrame, groups: list[list[int]]) -> tuple[Rule, list[int]] | None:
    """The first rule within a history that a subject's rows break (`groups`: each subject's
    row positions in `rows`), and that subject's row positions; None if all keep all."""
    found = history_rules(rules)
    if not found:
        return None
    owners = owners_of(groups, len(rows))
    for rule in found:
        ok = kept_within(rule, rows, owners)
        if not ok.all():
            return rule, groups[int(ok.index[np.flatnonzero(~ok.to_numpy())[0]])]
    return None


def owners_of(groups: list[list[int]], count: int) -> np.ndarray:
    """Each of `count` rows' subject (its group's index; -1 for a row in none)."""
    owners = np.full(count, -1)
    for s, group in enumerate(groups):
        owners[[i for i in group if 0 <= i < count]] = s
    return owners


def suggested_within(rows: pd.DataFrame, owners, kinds: dict[str, str], order_by: str | None,
                     declared: list[Rule]) -> list[dict]:
    """The rules within a history that the training subjects' rows (`owners`: each row's
    subject) show and the schema does not declare, as `rules:` entries: the columns constant
    within every subject (but not across subjects), and the number columns that grow by 1 per
    1 of the ordering column in every subject. Exact data: without DP only. `kinds`: each
    column's kind."""
    tied = {c for r in declared for c in r.columns}
    repeated = pd.Series(owners).value_counts().max() > 1 if len(rows) else False
    if not repeated:
        return []
    constant, steps = [], []
    for name, kind in kinds.items():
        if name in tied or name == order_by or kind == "text":
            continue
        if rows[name].nunique(dropna=False) > 1 and kept_within(Rule("constant", [name]), rows, owners).all():
            constant.append(name)
        elif order_by and kind in ("integer", "float") and kinds.get(order_by) in ("integer", "float") and \
                kept_within(Rule("step", [name, order_by], size=1.0), rows, owners).all():
            steps.append({"step": {"column": name, "per": order_by, "size": 1}})
    return ([{"constant": constant}] if constant else []) + steps


def kept_shares_within(rules: list[Rule], holdout: pd.DataFrame, synthetic: pd.DataFrame, key: str) -> dict:
    """Per declared rule within a history, the share of synthetic and of holdout subjects
    (event tables with their `key` column) that keep it (the report's)."""
    rules = history_rules(rules)
    out = {"rules": [r.describe() for r in rules], "unit": "subjects"}
    for name, rows in (("synthetic", synthetic), ("holdout", holdout)):
        kept_subjects = [kept_within(r, rows, rows[key]) for r in rules]
        out[name] = {"per_rule": [float(k.mean()) for k in kept_subjects],
                     "all_rules": float(pd.concat(kept_subjects, axis=1).all(axis=1).mean())}
    return out


def _constant_like(column: pd.Series, bound):
    return pd.Timestamp(bound) if pd.api.types.is_datetime64_any_dtype(column) else float(bound)


def _comparable(values):
    if isinstance(values, pd.Series):
        if pd.api.types.is_datetime64_any_dtype(values):
            return values.to_numpy(dtype="datetime64[ns]").astype("int64")
        return pd.to_numeric(values, errors="coerce").fillna(0).to_numpy(dtype=float)
    return pd.Timestamp(values).value if isinstance(values, pd.Timestamp) else values


def same_value(a, b) -> bool:
    """Is `b` (a typed value) the value `a` (a mapping's) names?"""
    if _missing(b):
        return False
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)
