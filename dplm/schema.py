"""Column kinds and their metadata: how each column's values look and what they may be.

A schema is either given by the user (a YAML file or a dict) or inferred from the data.
Inferred metadata comes from the private table, so under DP it may not reach the model or
the output: `Schema.check_dp_safe` refuses it unless it is user-given (or, later, estimated
with its own DP mechanism and charged to the budget).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import yaml

from dplm.errors import DplmError
from dplm.privacy import dp_categories, dp_mean, dp_range, number_grid
from dplm.rules import Rule, broken, derive, derived_columns, kept_all, mended, parse_rules, same_value

KINDS = ("categorical", "integer", "float", "datetime", "text")
DATE_FORMAT = "%Y-%m-%d"
MAX_INFERRED_PRECISION = 6
MAX_INFERRED_CATEGORIES = 1000

# Where a column's metadata came from: given by the user, learned from the (private) data
# without any privacy protection, or estimated with a DP mechanism.
SOURCES = ("user", "data", "dp")


@dataclass
class Column:
    """One column: its kind and the metadata that bounds its values."""

    name: str
    kind: str
    categories: list[str] | None = None  # categorical
    min: float | str | None = None  # integer/float: number; datetime: "YYYY-MM-DD"
    max: float | str | None = None
    precision: int = 0  # decimals kept for float columns (0 for integer)
    nullable: bool = False
    max_tokens: int | None = None  # text: cap on the tokens of one value
    # text: the values' mean tokens (within max_tokens), which sizes a DP text model's time:
    # given, or estimated under DP where a text model needs it (`estimate_schema_dp`)
    mean_tokens: float | None = None
    source: str = "user"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DplmError(
                f"schema column '{self.name}': unknown kind '{self.kind}'; use one of {', '.join(KINDS)}"
            )
        if self.source not in SOURCES:
            raise DplmError(f"schema column '{self.name}': unknown source '{self.source}'; use user, data or dp")
        if self.kind == "integer":
            self.precision = 0
        if self.kind == "categorical" and self.categories is not None:
            self.categories = [str(c) for c in self.categories]
            if len(set(self.categories)) != len(self.categories):
                raise DplmError(f"schema column '{self.name}': categories contain duplicates; list each once")
        if self.kind in ("integer", "float") and self.min is not None and self.max is not None:
            if float(self.min) > float(self.max):
                raise DplmError(f"schema column '{self.name}': min {self.min} is above max {self.max}; swap them")
        if self.mean_tokens is not None and (self.kind != "text" or not 0 < float(self.mean_tokens)):
            raise DplmError(f"schema column '{self.name}': mean_tokens is a text column's mean length in tokens, a "
                            "number above 0; drop it or give one")
        if self.kind == "datetime":
            for bound in (self.min, self.max):
                if bound is not None:
                    parse_date(str(bound), self.name)

    def missing_metadata(self) -> list[str]:
        """Names of the metadata fields this column still needs before it can be encoded."""
        if self.kind == "categorical":
            return [] if self.categories else ["categories"]
        if self.kind in ("integer", "float", "datetime"):
            return [k for k in ("min", "max") if getattr(self, k) is None]
        return [] if self.max_tokens else ["max_tokens"]

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}
        if self.kind != "float":
            out.pop("precision", None)
        return out


@dataclass
class Schema:
    """An ordered list of columns; the order is the serialization order, the order the model
    writes them in. `output_order`, when set, is the synthetic rows' column order (the input
    table's, which `Synthesizer.fit` records when the schema lists the columns otherwise).
    `rules` are the rules its owner declares (`dplm.rules`), kept by construction."""

    columns: list[Column] = field(default_factory=list)
    output_order: list[str] | None = None
    rules: list[Rule] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def names_of(self, *kinds: str) -> list[str]:
        """The names of the columns of these kinds, in schema order."""
        return [c.name for c in self.columns if c.kind in kinds]

    def __getitem__(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_dict(cls, spec: dict, source: str = "user") -> Schema:
        """Build from `{"columns": {name: {kind: ..., ...}, ...}}`."""
        if not isinstance(spec, dict) or not isinstance(spec.get("columns"), dict) or not spec["columns"]:
            raise DplmError("schema: expected a mapping 'columns:' of column name -> {kind: ..., ...}")
        allowed = {f.name for f in dataclasses.fields(Column)} - {"name"}
        columns = []
        for name, props in spec["columns"].items():
            props = dict(props or {})
            unknown = set(props) - allowed
            if unknown:
                raise DplmError(
                    f"schema column '{name}': unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
                )
            if "kind" not in props:
                raise DplmError(f"schema column '{name}': missing 'kind'; use one of {', '.join(KINDS)}")
            props.setdefault("source", source)
            columns.append(Column(name=str(name), **props))
        schema = cls(columns)
        schema.set_output_order(spec.get("output_order"))
        schema.rules = parse_rules(spec.get("rules"), schema.names)
        schema.check_rules()
        return schema

    @classmethod
    def from_yaml(cls, path: str) -> Schema:
        try:
            with open(path) as f:
                spec = yaml.safe_load(f)
        except FileNotFoundError:
            raise DplmError(f"schema file '{path}' not found; check the path") from None
        return cls.from_dict(spec)

    def set_output_order(self, order) -> None:
        """Make `order` (all the columns' names) the synthetic rows' column order; None, or the
        schema's own order, keeps the schema's."""
        if order is not None and sorted(map(str, order)) != sorted(self.names):
            raise DplmError(f"schema output_order {list(order)} must name each of the columns {self.names} once")
        self.output_order = None if order is None or list(order) == self.names else [str(c) for c in order]

    def in_order(self, order: list[str]) -> Schema:
        """This schema with its columns in `order` (any it leaves out follow, in this schema's
        order: text columns after the rest, so they are written knowing it); the synthetic rows
        keep the output order."""
        names = list(order) + [n for n in self.names if n not in order]
        out = Schema([self[n] for n in names], rules=self.rules)
        out.set_output_order(self.output_order or self.names)
        return out

    def without(self, names: list[str]) -> Schema:
        """All but the columns `names`, with the rules between the others alone and the output
        order cut to them."""
        if not names:
            return self
        out = Schema([c for c in self.columns if c.name not in names],
                     rules=[r for r in self.rules if not set(r.columns) & set(names)])
        if self.output_order:
            out.set_output_order([n for n in self.output_order if n not in names])
        return out

    def modelled(self) -> Schema:
        """The columns the model writes: all but those a declared rule determines (derived after
        sampling: `derive`), with the rules between them."""
        derived = derived_columns(self.rules)
        if not derived:
            return self
        out = Schema([c for c in self.columns if c.name not in derived],
                     rules=[r for r in self.rules if not set(r.columns) & set(derived)])
        if self.output_order:
            out.set_output_order([n for n in self.output_order if n not in derived])
        return out

    def derive(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Rows of the modelled columns, with the columns the rules determine added, in the
        output order."""
        if not derived_columns(self.rules):
            return rows
        return derive(rows, self.rules)[self.output_order or self.names]

    def given_for_model(self, given: pd.DataFrame) -> pd.DataFrame:
        """Values given for conditional sampling (`check_given`) as the model takes them: a given
        column that a rule determines becomes its source's value (the source's one value that
        maps to it, when the source is not given) and is derived again after sampling. Given
        values that break a declared rule are a one-line error."""
        given = check_given(given, self)
        found = broken(self.rules, given)
        if found:
            rule, row = found
            raise DplmError(f"given row {row} breaks the schema rule '{rule.describe()}'; fix the given table")
        for target, rule in derived_columns(self.rules).items():
            if target not in given.columns:
                continue
            source = rule.columns[0]
            if source not in given.columns:
                given[source] = pd.Series([self._source_of(rule, value, row) for row, value in enumerate(given[target])],
                                          dtype=object)
            given = given.drop(columns=[target])
        return given

    def _source_of(self, rule: Rule, value, row: int):
        if value is None:
            return None
        sources = [key for key, mapped in rule.values.items() if same_value(mapped, value)]
        if len(sources) != 1:
            raise DplmError(f"given column '{rule.columns[1]}', row {row}: {value!r} is what {len(sources)} values of "
                            f"'{rule.columns[0]}' map to (schema rule '{rule.describe()}'); give '{rule.columns[0]}'")
        return _typed_value(self[rule.columns[0]], sources[0])

    def check_rules(self) -> None:
        """Each declared rule fits its columns' kinds and metadata; one-line errors."""
        derived = derived_columns(self.rules)
        for rule in self.rules:
            kinds = [self[c].kind for c in rule.columns]
            if "text" in kinds:
                raise DplmError(f"schema rule {rule.describe()}: text columns take no rules")
            if rule.kind not in ("mapping", "one_to_one") and set(rule.columns) & set(derived):
                raise DplmError(f"schema rule {rule.describe()}: a column another rule determines takes no other "
                                "rule; state it on the column it is derived from")
            if rule.kind == "exclusive" and any(k not in ("integer", "float") for k in kinds):
                raise DplmError(f"schema rule {rule.describe()}: exclusive columns are numbers")
            if rule.kind == "step" and (any(k not in ("integer", "float") for k in kinds) or
                                        rule.columns[0] == rule.columns[1]):
                raise DplmError(f"schema rule {rule.describe()}: a step ties two different number columns")
            if rule.kind == "combinations":
                if any(k != "categorical" for k in kinds):
                    raise DplmError(f"schema rule {rule.describe()}: combinations are of categorical columns")
                for combination in rule.values:
                    for name, value in zip(rule.columns, combination):
                        if self[name].categories and value not in self[name].categories:
                            raise DplmError(f"schema rule {rule.describe()}: '{value}' is not a category of '{name}'")
            if rule.kind == "inequality" and (any(k not in ("integer", "float", "datetime") for k in kinds)
                                              or len({k if k == "datetime" else "number" for k in kinds}) > 1):
                raise DplmError(f"schema rule {rule.describe()}: an inequality compares number or date columns of "
                                "one kind (or a column and a constant)")
            if rule.kind == "mapping":
                source, target = (self[c] for c in rule.columns)
                for value, mapped in rule.values.items():
                    if source.kind == "categorical" and source.categories and value not in source.categories:
                        raise DplmError(f"schema rule mapping: '{value}' is not a category of '{source.name}'")
                    typed = str(mapped) if target.kind == "categorical" else pd.Timestamp(mapped) \
                        if target.kind == "datetime" else mapped
                    if target.categories or target.min is not None:
                        if not value_fits(target, typed):
                            raise DplmError(f"schema rule mapping: {mapped!r} (for '{value}') does not fit column "
                                            f"'{target.name}'")

    def to_dict(self) -> dict:
        out = {"columns": {c.name: c.to_dict() for c in self.columns}}
        if self.output_order:
            out["output_order"] = self.output_order
        if self.rules:
            out["rules"] = [r.to_dict() for r in self.rules]
        return out

    def to_yaml(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, allow_unicode=True)

    # ---- checks ---------------------------------------------------------------------

    def check_columns(self, df: pd.DataFrame, allow_extra: bool = False) -> None:
        """The table must have the schema's columns (order may differ), and no others unless
        `allow_extra` (columns a schema is about to be completed with)."""
        missing = [n for n in self.names if n not in df.columns]
        if missing:
            raise DplmError(
                f"column(s) {missing} are in the schema but not in the table; fix the schema or the data"
            )
        extra = [str(n) for n in df.columns if n not in self.names]
        if extra and not allow_extra:
            raise DplmError(
                f"column(s) {extra} are in the table but not in the schema; add them to the schema or drop them"
            )

    def check_dp_safe(self) -> None:
        """Under DP every column's metadata must be user-given or DP-estimated."""
        for c in self.columns:
            if c.source == "data":
                raise DplmError(
                    f"column '{c.name}': DP training needs its metadata ({', '.join(_metadata_fields(c))}) "
                    "given in the schema file; metadata learned from the private data would leak it "
                    "(or let dplm estimate it under DP: leave it out of the schema)"
                )
            gaps = c.missing_metadata()
            if gaps:
                raise DplmError(f"column '{c.name}': DP training needs '{', '.join(gaps)}' given in the schema file")


def _metadata_fields(c: Column) -> list[str]:
    return {"categorical": ["categories"], "text": ["max_tokens"]}.get(c.kind, ["min", "max"])


def parse_date(text: str, column: str) -> dt.date:
    try:
        return dt.datetime.strptime(text, DATE_FORMAT).date()
    except ValueError:
        raise DplmError(f"column '{column}': '{text}' is not a date in YYYY-MM-DD form") from None


def infer_schema(df: pd.DataFrame, given: Schema | None = None, text_lengths=None) -> Schema:
    """Complete `given` (which may be None or cover some columns) from the data.

    Everything learned here is marked `source: data`: fine without DP, refused under DP.
    `text_lengths(values) -> token counts` measures text lengths with the model's tokenizer.
    """
    if given:
        given.check_columns(df, allow_extra=True)
    given_names = set(given.names) if given else set()
    columns = []
    for name in df.columns:
        name = str(name)
        if name in given_names:
            col = dataclasses.replace(given[name])
            gaps = col.missing_metadata()
            if gaps:
                learned = _infer_column(name, df[name], col.kind, text_lengths)
                for k in gaps:
                    setattr(col, k, getattr(learned, k))
                col.source = "data"
            columns.append(col)
        else:
            columns.append(_infer_column(name, df[name], None, text_lengths))
    return _in_given_order(columns, given)


def _in_given_order(columns: list[Column], given: Schema | None) -> Schema:
    """A completed schema: the given schema's columns in its order, then the table's others
    (which also follow the given output order, if any)."""
    if given:
        order = {n: i for i, n in enumerate(given.names)}
        columns = sorted(columns, key=lambda c: order.get(c.name, len(order)))
    schema = Schema(columns, rules=list(given.rules) if given else [])
    if given and given.output_order:
        schema.set_output_order(given.output_order + schema.names[len(given.names):])
    return schema


TEXT_LENGTH_EDGES = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                              1536, 2048])


@dataclass
class MetadataSpend:
    """Privacy spent on metadata before training: the schema's DP estimates and a history cap's."""

    epsilon: float = 0.0
    delta: float = 0.0
    estimated: dict[str, list[str]] = field(default_factory=dict)  # column -> the fields estimated under DP

    def plus(self, epsilon: float, estimated: dict[str, list[str]]) -> MetadataSpend:
        """This spend and one more epsilon-DP estimate (basic composition)."""
        return MetadataSpend(self.epsilon + epsilon, self.delta, {**self.estimated, **estimated})


def dp_metadata_spend(schema: Schema, epsilon: float, delta: float, text_means: list[str] = ()) -> MetadataSpend:
    """What `estimate_schema_dp` will spend completing `schema` (every column's kind given) and
    the mean lengths of the `text_means` columns that it leaves out: `epsilon` when anything is
    missing, `delta` when any category set is, and which fields of which columns. Depends on
    the schema alone, so `dplm plan` knows it in advance."""
    estimated = {c.name: _dp_gaps(c, text_means) for c in schema.columns if _dp_gaps(c, text_means)}
    categorical = any(schema[name].kind == "categorical" for name in estimated)
    return MetadataSpend(epsilon if estimated else 0.0, delta if categorical else 0.0, estimated)


def _dp_gaps(col: Column, text_means: list[str]) -> list[str]:
    """The fields of `col` to estimate under DP: its missing metadata, and its mean length where
    it is one of `text_means` (text columns whose models size their time by it) and not given."""
    mean = ["mean_tokens"] if col.name in text_means and col.mean_tokens is None else []
    return col.missing_metadata() + mean


def require_kinds(df: pd.DataFrame, given: Schema | None) -> Schema:
    """Under DP the schema must give the kind of every column of `df` (its metadata may be
    left out): `given` itself, or a one-line error naming the first column it lacks."""
    given = given or Schema([])
    unknown = [str(n) for n in df.columns if n not in given.names]
    if unknown:
        raise DplmError(f"column '{unknown[0]}': DP training needs its kind from the schema file (a kind read off "
                        f"the data would leak it); add '{unknown[0]}: {{kind: categorical}}' (or integer, float, "
                        "datetime, text) to the schema, leaving its metadata out for a DP estimate, or drop the column")
    given.check_columns(df)
    return given


def estimate_schema_dp(df: pd.DataFrame, given: Schema | None, units: list[list[int]], epsilon: float,
                       delta: float, text_lengths, rng, text_means: list[str] = ()) -> tuple[Schema, MetadataSpend]:
    """Complete `given` with metadata estimated under DP (`source: dp`); user-given metadata
    is kept as it is. Returns the schema and what was spent on it (`dp_metadata_spend`).

    Every column's kind must be given: a kind guessed from the data (even from its pandas
    dtype, which `read_csv` infers from the values) would be a release without epsilon.
    Each privacy unit (subject, or row) contributes one random row per column, so every
    estimate has sensitivity 1. `epsilon` is split equally over the mechanisms below (basic
    composition); `delta` goes to the category sets, the only (eps, delta) mechanism:
    * categories: noisy-count thresholding (`privacy.dp_categories`); values below the
      threshold never reach the model (rows holding them get a missing value);
    * numeric bounds and datetime ranges: a noisy histogram over public bins
      (`privacy.dp_range`: the `number_grid`, or the months 1900-2100); values outside are
      clipped;
    * text length caps: the same over token counts (`TEXT_LENGTH_EDGES`); longer values are cut;
    * the mean tokens of the `text_means` columns (within the cap): a noisy mean (`privacy.dp_mean`).
    Columns with estimated metadata other than a mean length are nullable.
    `rng` needs `integers(n)` and `laplace(loc, scale, size)` (`privacy.secret_rng`).
    """
    given = require_kinds(df, given)
    columns, todo = [], []
    for name in map(str, df.columns):
        col = dataclasses.replace(given[name])
        gaps = _dp_gaps(col, text_means)
        if gaps:
            col.source, col.nullable = "dp", col.nullable or gaps != ["mean_tokens"]
            todo.append((col, gaps))
        columns.append(col)
    categorical = sum(col.kind == "categorical" for col, _ in todo)
    spent = dp_metadata_spend(given, epsilon, delta, text_means)
    if not todo:
        return _in_given_order(columns, given), spent
    # One mechanism for a column's categories, range or cap, one more for a text's mean length.
    eps = epsilon / sum((gaps != ["mean_tokens"]) + ("mean_tokens" in gaps) for _, gaps in todo)
    picks = np.array([unit[rng.integers(len(unit))] for unit in units])  # one random row per unit
    for col, gaps in todo:
        values = df[col.name].iloc[picks].dropna()
        lengths = np.array(text_lengths(values.astype(str).tolist()), dtype=float) if col.kind == "text" else None
        found = gaps == ["mean_tokens"] or _estimate_bounds(col, values, lengths, eps, delta / max(categorical, 1), rng)
        if found and "mean_tokens" in gaps:
            col.mean_tokens = round(dp_mean(lengths, col.max_tokens, eps, rng), 1)
        if not found:
            raise DplmError(f"column '{col.name}': too few {'subjects' if any(len(u) > 1 for u in units) else 'rows'} "
                            f"for a DP estimate of its {', '.join(gaps)} at epsilon {eps:.3g}; give them in the "
                            "schema or raise privacy.metadata_epsilon")
        if col.kind in ("integer", "float", "datetime") and _bound_value(col.min) > _bound_value(col.max):
            raise DplmError(f"column '{col.name}': the DP estimate of its range does not fit the given bound; "
                            "give both min and max")
    return _in_given_order(columns, given), spent


def _estimate_bounds(col: Column, values: pd.Series, lengths: np.ndarray | None, eps: float, delta: float,
                     rng) -> bool:
    """Fill `col`'s missing categories, range or text cap from `values` (one per unit; a text's
    token `lengths`) with one DP mechanism (`estimate_schema_dp`); False when too few units pass."""
    epoch = pd.Timestamp("1970-01-01")
    if col.kind == "categorical":
        col.categories = dp_categories(values.astype(str).tolist(), eps, delta, rng)
        return bool(col.categories)
    if col.kind in ("integer", "float"):
        nums = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
        found = dp_range(nums, number_grid(), eps, rng)
        if found:
            lo, hi = (math.floor(found[0]), math.ceil(found[1])) if col.kind == "integer" else found
            col.min = _plain(lo) if col.min is None else col.min
            col.max = _plain(hi) if col.max is None else col.max
        return bool(found)
    if col.kind == "datetime":
        days = (pd.to_datetime(values, errors="coerce").dropna() - epoch).dt.days.to_numpy(dtype=float)
        edges = (pd.date_range("1900-01-01", "2100-12-01", freq="MS") - epoch).days.to_numpy(dtype=float)
        found = dp_range(days, edges, eps, rng)
        if found:
            lo, hi = (epoch + pd.Timedelta(days=d) for d in found)
            col.min = lo.strftime(DATE_FORMAT) if col.min is None else col.min
            col.max = (hi - pd.Timedelta(days=1)).strftime(DATE_FORMAT) if col.max is None else col.max
        return bool(found)
    found = dp_range(lengths, TEXT_LENGTH_EDGES, eps, rng)
    if found:
        col.max_tokens = int(found[1])
    return bool(found)


def _bound_value(bound):
    return pd.Timestamp(bound) if isinstance(bound, str) else float(bound)


def _dtype_kind(s: pd.Series) -> str:
    """A column's kind from its pandas dtype (without DP only: file readers infer dtypes from the values)."""
    if pd.api.types.is_bool_dtype(s):
        return "categorical"
    if pd.api.types.is_integer_dtype(s):
        return "integer"
    if pd.api.types.is_float_dtype(s):
        return "float"
    if pd.api.types.is_datetime64_any_dtype(s):
        return "datetime"
    return "categorical"


def _infer_column(name: str, s: pd.Series, kind: str | None, text_lengths) -> Column:
    nullable = bool(s.isna().any())
    values = s.dropna()
    if kind is None:
        kind = _guess_kind(values)
    col = Column(name=name, kind=kind, nullable=nullable, source="data")
    if len(values) == 0:
        raise DplmError(f"column '{name}': all values are missing; drop the column or give its metadata")
    if kind == "categorical":
        col.categories = sorted(values.astype(str).unique().tolist())
    elif kind in ("integer", "float"):
        nums = pd.to_numeric(values, errors="coerce")
        if nums.isna().any():
            bad = values[nums.isna()].iloc[0]
            raise DplmError(f"column '{name}': value '{bad}' is not a number; fix the data or declare it categorical")
        col.min, col.max = _plain(nums.min()), _plain(nums.max())
        if kind == "float":
            col.precision = _decimals(nums)
    elif kind == "datetime":
        dates = pd.to_datetime(values, errors="coerce")
        col.min, col.max = dates.min().strftime(DATE_FORMAT), dates.max().strftime(DATE_FORMAT)
    elif kind == "text":
        col.max_tokens = max(text_lengths(values.astype(str).tolist())) if text_lengths else 256
    return col


def _guess_kind(values: pd.Series) -> str:
    """A column's kind from its dtype, refined by its values (without DP only)."""
    kind = _dtype_kind(values)
    if kind == "float":
        return "integer" if bool((values == values.round()).all()) else "float"
    if kind != "categorical" or pd.api.types.is_bool_dtype(values):
        return kind
    text = values.astype(str)
    if pd.to_numeric(text, errors="coerce").notna().all():
        nums = pd.to_numeric(text)
        return "integer" if bool((nums == nums.round()).all()) else "float"
    if text.str.fullmatch(r"\d{4}-\d{2}-\d{2}").all():
        return "datetime"
    if text.nunique() <= min(MAX_INFERRED_CATEGORIES, max(20, len(text) // 2)):
        return "categorical"
    return "text"


def _decimals(nums: pd.Series) -> int:
    for p in range(MAX_INFERRED_PRECISION + 1):
        scaled = nums.to_numpy(dtype=float) * 10**p
        if np.allclose(scaled, np.round(scaled), rtol=0, atol=1e-6):
            return p
    return MAX_INFERRED_PRECISION


def _plain(x):
    """numpy scalar -> int or float for YAML."""
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def format_number(value: float, precision: int) -> str:
    """The canonical text of a number: fixed decimals, no exponent, no '-0'."""
    if precision == 0:
        text = str(int(round(float(value))))
    else:
        text = f"{float(value):.{precision}f}"
    if text.lstrip("-").strip("0.") == "":
        text = text.lstrip("-")
    return text


def coerce_table(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Return the table in schema column order with every value checked against its column.

    Numbers outside user-given bounds are clipped (the standard DP treatment of bounds);
    anything that does not fit its column's kind is an error naming the column and value.
    """
    schema.check_columns(df)
    out = {}
    for col in schema.columns:
        s = df[col.name]
        isna = s.isna()
        if isna.any() and not col.nullable:
            raise DplmError(
                f"column '{col.name}': has missing values but the schema says nullable: false; "
                "set nullable: true or fill them"
            )
        out[col.name] = _coerce_column(col, s, isna)
    return pd.DataFrame(out)


def _coerce_column(col: Column, s: pd.Series, isna: pd.Series) -> pd.Series:
    present = s[~isna]
    if col.kind == "categorical":
        text = s.astype(str)
        unknown = ~isna & ~text.isin(set(col.categories or []))
        if unknown.any() and col.source != "dp":
            raise DplmError(
                f"column '{col.name}': value '{text[unknown].iloc[0]}' is not one of its categories; "
                "add it to the schema's categories or fix the data"
            )
        # Under DP-estimated categories, values rarer than the threshold never reach the model.
        return text.astype(object).where(~(isna | unknown), None)
    if col.kind in ("integer", "float"):
        nums = pd.to_numeric(present, errors="coerce")
        if nums.isna().any():
            raise DplmError(
                f"column '{col.name}': value '{present[nums.isna()].iloc[0]}' is not a number "
                f"but the column kind is {col.kind}; fix the data or the schema"
            )
        if col.kind == "integer" and not (nums == nums.round()).all():
            bad = present[nums != nums.round()].iloc[0]
            raise DplmError(
                f"column '{col.name}': value '{bad}' is not a whole number; declare the column float or fix the data"
            )
        nums = nums.clip(float(col.min), float(col.max)).round(col.precision)
        full = pd.Series(np.nan, index=s.index, dtype=float)
        full[~isna] = nums.astype(float)
        if col.kind == "integer":
            return full.astype("Int64")
        return full
    if col.kind == "datetime":
        dates = pd.to_datetime(present, errors="coerce", format="mixed")
        if dates.isna().any():
            raise DplmError(
                f"column '{col.name}': value '{present[dates.isna()].iloc[0]}' is not a date; fix the data or the schema"
            )
        lo, hi = pd.Timestamp(col.min), pd.Timestamp(col.max)
        full = pd.Series(pd.NaT, index=s.index, dtype="datetime64[ns]")
        full[~isna] = dates.dt.normalize().clip(lo, hi).astype("datetime64[ns]")
        return full
    result = s.astype(object).where(isna, s.astype(str))
    return result.where(~isna, None)


def check_given(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Values given for conditional sampling, typed as the schema's (floats at its precision,
    dates at midnight); a column or value the schema does not allow is a one-line error naming
    the column and the row (its position in `df`, from 0). Unlike `coerce_table` nothing is
    clipped: a given value is kept exactly or refused. Missing values stay missing (nullable
    columns only)."""
    unknown = [str(c) for c in df.columns if c not in schema.names]
    if unknown:
        raise DplmError(f"given column '{unknown[0]}' is not in the run's schema; give only columns of {schema.names}")
    if len(df) == 0 or len(df.columns) == 0:
        raise DplmError("the given table has no rows or no columns; give one row per row to generate, with the "
                        "columns to keep")
    out = {}
    for name in df.columns:
        col, values = schema[name], []
        for row, value in enumerate(df[name].tolist()):
            try:
                typed = _typed_value(col, value)
                ok = value_fits(col, typed)
            except (TypeError, ValueError):
                typed, ok = value, False
            if not ok:
                why = "is missing and the column is not nullable" if typed is None else _not_allowed(col)
                raise DplmError(f"given column '{name}', row {row}: {value!r} {why}; fix the given table or the schema")
            values.append(typed)
        out[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(out)


def _typed_value(col: Column, value):
    if value is None or value is pd.NaT or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if col.kind in ("categorical", "text"):
        return str(value)
    if col.kind == "datetime":
        date = pd.Timestamp(value)
        if date != date.normalize():
            raise ValueError("not a whole day")
        return date
    number = float(value)
    if col.kind == "integer":
        if not number.is_integer():
            raise ValueError("not a whole number")
        return int(number)
    return round(number, col.precision)


def _not_allowed(col: Column) -> str:
    if col.kind == "categorical":
        return "is not one of its categories"
    what = {"integer": "a whole number", "float": "a number", "datetime": "a date (YYYY-MM-DD)"}[col.kind]
    return f"is not {what} in [{col.min}, {col.max}]"


def value_fits(col: Column, value) -> bool:
    """Does one (parsed) value satisfy its column's metadata?"""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return col.nullable
    if col.kind == "categorical":
        return value in col.categories
    if col.kind in ("integer", "float"):
        return float(col.min) <= float(value) <= float(col.max)
    if col.kind == "datetime":
        return pd.Timestamp(col.min) <= pd.Timestamp(value) <= pd.Timestamp(col.max)
    return isinstance(value, str)


def random_records(schema: Schema, num: int, rng: np.random.Generator) -> pd.DataFrame:
    """`num` records drawn uniformly and independently per column from the schema's domain
    (the audit's canaries and their references), keeping its declared rules: drawn over the
    modelled columns, mended (`rules.mended`), the determined columns derived."""
    if not schema.rules:
        return uniform_records(schema, num, rng)
    modelled = schema.modelled()
    records = mended(uniform_records(modelled, 4 * num, rng), modelled.rules, rng)
    records = records[kept_all(modelled.rules, records)].head(num).reset_index(drop=True)
    if len(records) < num:
        raise DplmError(f"schema rules: fewer than {num} random records keep them (for the audit's canaries); "
                        "lower audit.canaries or check the rules")
    return schema.derive(records)


def uniform_records(schema: Schema, num: int, rng: np.random.Generator) -> pd.DataFrame:
    """`num` records drawn uniformly and independently per column from the schema's domain."""
    columns = {}
    for col in schema.columns:
        if col.kind == "categorical":
            columns[col.name] = rng.choice(np.array(col.categories, dtype=object), num)
        elif col.kind in ("integer", "float"):
            scale = 10**col.precision
            values = rng.integers(math.ceil(float(col.min) * scale), math.floor(float(col.max) * scale) + 1, num)
            columns[col.name] = values if col.kind == "integer" else values / scale
        elif col.kind == "datetime":
            lo, hi = pd.Timestamp(col.min), pd.Timestamp(col.max)
            columns[col.name] = lo + pd.to_timedelta(rng.integers(0, (hi - lo).days + 1, num), unit="D")
        else:
            words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8)))
                     for _ in range(num * 4)]
            columns[col.name] = [" ".join(words[4 * i: 4 * i + 4]) for i in range(num)]
    return pd.DataFrame(columns)
