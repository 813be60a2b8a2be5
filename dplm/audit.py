"""Empirical privacy audit of a trained run: does the model remember its training records?

Two attacks on the model's per-record loss (mean next-token loss of a serialized row), and
one on the synthetic rows:

* membership inference: score = -loss; training rows should not score higher than holdout
  rows. Reported as the ROC AUC (0.5 = chance) and the true-positive rate at a 1 %
  false-positive rate (chance: 0.01).
* canaries (Carlini et al. 2019, "The Secret Sharer"): `audit.canaries` random records drawn
  uniformly from the schema's domain were added to the training rows (see
  `Synthesizer.fit`); each canary's loss is ranked among `num_references` fresh records from
  the same distribution. Exposure = log2(references + 1) - log2(rank): about 1 bit for
  records the model never saw, up to log2(references + 1) for memorized ones. A text
  column's canaries are random word strings; their exposure is also measured on the text's
  tokens alone (given the rest of the record), where memorized words would show first.
* attribute inference: an attacker who knows a record's other columns guesses its
  sensitive column (`audit.sensitive_column`, default the report's target) from the
  synthetic rows alone: the value of the nearest synthetic row, and a classifier trained on
  the synthetic rows. Its accuracy on training rows minus its accuracy on holdout rows is the
  advantage the synthetic rows give about the people they were trained on (0: none beyond
  what they tell about anyone).

DP bounds what any such attack can achieve; these numbers are a sanity check of the
implementation, not a proof. `dplm audit RUN_DIR` writes `audit.json` into the run, and
`dplm report` shows it when present.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dplm import model as models
from dplm.data import load_table
from dplm.errors import DplmError
from dplm.evaluate import FeatureMatrix, MixedEncoder, align_types, nearest
from dplm.schema import coerce_table, random_records
from dplm.synthesizer import Synthesizer
from dplm.train import pad_batch, row_losses
from dplm.workspace import RunDirectory


def record_losses(synth, df: pd.DataFrame, batch_size: int = 64, column: str | None = None) -> np.ndarray:
    """The model's mean next-token loss of each record (lower: more familiar), or of the tokens
    of one `column`'s value, given the record's other columns before it: the text model's where
    the column has one (`text_model`), else the table model's."""
    text_model = next((t for t in synth.text_models if t.column == column), None)
    model, codec = (text_model.model, text_model.codec) if text_model else (synth.model, synth.codec)
    typed = coerce_table(df[codec.schema.names], codec.schema)  # the columns the model writes
    encoded = [codec.encode_with_spans(row) for row in typed.itertuples(index=False, name=None)]
    return sequence_losses(model, codec.tokenizer, synth.device, encoded, batch_size,
                           None if column is None else codec.schema.names.index(column))


def history_losses(synth, events: pd.DataFrame, key: str, batch_size: int = 16) -> np.ndarray:
    """The model's mean next-token loss of each subject's whole history (`events`: the subjects'
    rows with their key and own columns, one loss per key in order of appearance)."""
    codec = synth.codec
    typed = coerce_table(events.drop(columns=[key]), synth.schema)
    order = synth.config.data.order_by
    encoded = []
    for _, rows in typed.groupby(events[key].to_numpy(), sort=False):
        rows = rows.sort_values(order, kind="stable") if order else rows
        subject = rows.iloc[0][codec.subject_schema.names].to_dict() if codec.subject_schema.names else {}
        encoded.append((codec.encode(subject, rows.iloc[: codec.max_rows]), None))
    return sequence_losses(synth.model, synth.tokenizer, synth.device, encoded, batch_size)


@torch.no_grad()
def sequence_losses(model, tokenizer, device, encoded: list, batch_size: int, column: int | None = None) -> np.ndarray:
    """`model`'s mean next-token loss of each (token ids, value spans) sequence, or of column
    `column`'s tokens."""
    target_index = models.target_index(model)
    model.eval()
    losses = []
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i: i + batch_size]
        ids, mask = pad_batch([e[0] for e in batch], tokenizer.pad_token_id, device)
        scored = None
        if column is not None:
            scored = torch.zeros_like(mask)
            for row, (_, spans) in enumerate(batch):
                scored[row, spans[column][0]: spans[column][1]] = 1
        losses.append(row_losses(model, ids, mask, target_index, scored=scored).float().cpu())
    return torch.cat(losses).numpy()


def membership_inference(member_losses: np.ndarray, other_losses: np.ndarray) -> dict:
    """ROC AUC and TPR at 1 % FPR of the attack 'lower loss means member'."""
    from sklearn.metrics import roc_auc_score, roc_curve  # heavy: imported when an audit runs

    labels = np.r_[np.ones(len(member_losses)), np.zeros(len(other_losses))]
    scores = -np.r_[member_losses, other_losses]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"auc": float(roc_auc_score(labels, scores)), "tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
            "members": len(member_losses), "non_members": len(other_losses)}


def read_canaries(run_dir: Path, names: list[str]) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """The run's canaries (their `names` columns) and which of them trained (canaries.csv's
    "(included)"; a run saved before the coins trained every canary); (None, None) without any."""
    path = Path(run_dir) / "canaries.csv"
    if not path.exists():
        return None, None
    canaries = pd.read_csv(path)
    included = canaries["(included)"].to_numpy(dtype=bool) if "(included)" in canaries else np.ones(len(canaries), bool)
    return canaries[names], included


def canary_scores(losses_of, canaries: pd.DataFrame, included: np.ndarray, references: pd.DataFrame, synth) -> dict:
    """The canaries' audit: the exposure of those that trained among fresh `references`, and the
    one-run lower bound on epsilon (`one_run_epsilon`) from telling the trained ones from the
    others by their loss (`losses_of(records)`, a loss per record: lower, more familiar)."""
    canary_losses, reference_losses = losses_of(canaries), losses_of(references)
    out = {"count": len(canaries), "training": int(included.sum()), "references": len(references),
           "repeats": synth.config.audit.canary_repeats, "max_possible": float(math.log2(len(references) + 1))}
    if included.any():
        bits = exposure(canary_losses[included], reference_losses)
        out.update(mean_exposure=float(bits.mean()), max_exposure=float(bits.max()))
    if synth.config.audit.canary_inclusion == 0.5 and 0 < included.sum() < len(included):
        delta = synth.privacy_record.get("delta") or 0.0
        out["one_run"] = one_run_epsilon(-canary_losses, included, delta)
    return out


AUDIT_CONFIDENCE = 0.95  # of the one-run lower bound on epsilon
GUESS_SHARES = (0.05, 0.1, 0.2, 0.5)  # canaries guessed on each side (shares of all); the rest abstain


def one_run_epsilon(scores: np.ndarray, trained: np.ndarray, delta: float, confidence: float = AUDIT_CONFIDENCE
                    ) -> dict:
    """A lower bound on epsilon from one training run (Steinke, Nasr and Jagielski 2023, "Privacy
    Auditing with One (1) Training Run"): each of m canaries trained with probability 1/2 (a
    secret coin, `trained`); the auditor guesses "trained" for the k highest `scores` and "not"
    for the k lowest, abstaining on the rest. Under (epsilon, delta)-DP the correct guesses are
    at most a Binomial(2k, e^epsilon / (1 + e^epsilon)) plus a delta term, so a count that such a
    binomial reaches with probability below 1 - `confidence` rules epsilon out. The bound is the
    largest such epsilon over k in `GUESS_SHARES` of m (Bonferroni over the k tried)."""
    m = len(scores)
    order = np.argsort(-np.asarray(scores), kind="stable")
    alpha = (1 - confidence) / len(GUESS_SHARES)
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    for share in GUESS_SHARES:
        k = max(1, min(m // 2, int(share * m)))
        correct = int(trained[order[:k]].sum() + (~trained[order[m - k:]]).sum())
        epsilon = epsilon_lower_bound(m, 2 * k, correct, delta, alpha)
        if epsilon > best["epsilon_lower_bound"] or not best["guesses"]:
            best = {"epsilon_lower_bound": epsilon, "guesses": 2 * k, "correct": correct}
    return {**best, "canaries": m, "confidence": confidence, "delta": delta}


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, alpha: float) -> float:
    """The largest epsilon (to 1e-4) whose `guess_p_value` for `correct` of `guesses` is below
    `alpha` (0 if none is)."""
    if guess_p_value(m, guesses, correct, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while guess_p_value(m, guesses, correct, high, delta) < alpha:
        low, high = high, 2 * high
    while high - low > 1e-4:
        mid = (low + high) / 2
        low, high = (mid, high) if guess_p_value(m, guesses, correct, mid, delta) < alpha else (low, mid)
    return low


def guess_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Steinke et al.'s bound on P[at least `correct` of `guesses` right] for an (epsilon, delta)-DP
    run with m canaries: P[Binomial(guesses, q) >= correct] with q = e^eps / (1 + e^eps), plus
    2 m delta times the largest P[correct > Binomial >= correct - i] / i."""
    from scipy.stats import binom  # heavy: imported when an audit runs

    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))
    below = np.cumsum(binom.pmf(correct - np.arange(1, correct + 1), guesses, q))
    spread = float((below / np.arange(1, correct + 1)).max()) if correct else 0.0
    return min(1.0, tail + 2 * m * delta * spread)


def exposure(canary_losses: np.ndarray, reference_losses: np.ndarray) -> np.ndarray:
    """Carlini et al.'s exposure of each canary among the references (in bits)."""
    ranks = 1 + (reference_losses[None, :] < canary_losses[:, None]).sum(axis=1)
    return np.log2(len(reference_losses) + 1) - np.log2(ranks)


def attribute_inference(members: pd.DataFrame, non_members: pd.DataFrame, synthetic: pd.DataFrame, sensitive: str,
                        skip: tuple[str, ...] = (), seed: int = 0) -> dict:
    """Accuracy of guessing `sensitive` from a record's other columns (less `skip`, e.g. free
    text) with the synthetic rows only, on training records (`members`) vs holdout records:
    the nearest synthetic row's value, a classifier fitted on the synthetic rows, and the
    synthetic rows' most common value (the guess that needs no other column)."""
    features = [c for c in synthetic.columns if c not in (sensitive, *skip)]
    labels = synthetic[sensitive].astype(str).to_numpy()
    encoder, matrix = MixedEncoder(synthetic[features]), FeatureMatrix(synthetic, features)
    synthetic_x = encoder.encode(synthetic[features])
    classifier = matrix.classifier(seed).fit(matrix(synthetic), labels) if len(set(labels)) > 1 else None
    guesses = {
        "nearest_neighbour": lambda df: labels[nearest(encoder.encode(df[features]), synthetic_x)[1]],
        "classifier": lambda df: classifier.predict(matrix(df)) if classifier else np.full(len(df), labels[0]),
        "majority": lambda df: np.full(len(df), pd.Series(labels).mode()[0]),
    }
    result = {"column": sensitive, "members": len(members), "non_members": len(non_members)}
    for attack, guess in guesses.items():
        members_acc, others_acc = (float(np.mean(guess(df) == df[sensitive].astype(str).to_numpy()))
                                   for df in (members, non_members))
        result[attack] = {"accuracy_members": members_acc, "accuracy_non_members": others_acc,
                          "advantage": members_acc - others_acc}
    result["advantage"] = max(result[a]["advantage"] for a in ("nearest_neighbour", "classifier"))
    return result


def sensitive_column(synth, run_dir: Path, requested: str | None = None) -> str | None:
    """The column attribute inference guesses: as asked, else `audit.sensitive_column`, else the
    target of the run's report if categorical, else the table's last categorical column."""
    kinds = set(synth.schema.names_of("categorical"))
    categorical = [name for name in synth.schema.output_order or synth.schema.names if name in kinds]
    requested = requested or synth.config.audit.sensitive_column
    if requested:
        if requested not in categorical:
            raise DplmError(f"attribute inference guesses a categorical column; '{requested}' is not one of the "
                            f"run's categorical columns ({', '.join(categorical) or 'none'}): set audit.sensitive_column")
        return requested
    target = RunDirectory(run_dir).json("report.json", {}).get("utility", {}).get("target")
    return target if target in categorical else (categorical[-1] if categorical else None)


def audit_run(run_dir: str | Path, num_records: int = 1000, num_references: int = 1000, seed: int = 0,
              sensitive: str | None = None) -> dict:
    """Run the attacks on a run directory and write `audit.json` there; returns the results.
    Attribute inference needs the run's `synthetic.csv` (written by `dplm train`)."""
    run_dir = Path(run_dir)
    synth = Synthesizer.load(run_dir)
    if not synth.split or synth.config.data.source is None:
        raise DplmError(f"run '{run_dir}' records no data source and split; the audit needs its training rows")
    synthetic_csv = run_dir / "synthetic.csv"
    if (sensitive or synth.config.audit.sensitive_column) and not synthetic_csv.exists():
        raise DplmError(f"attribute inference needs the run's synthetic rows and '{run_dir}' has no synthetic.csv; "
                        f"write them with `dplm generate {run_dir} -n 2000 -o {synthetic_csv}`")
    attribute = sensitive_column(synth, run_dir, sensitive) if synthetic_csv.exists() else None
    known = [c for c in synth.schema.names_of("categorical", "integer", "float", "datetime") if c != attribute]
    attribute = attribute if known else None  # nothing to guess from but free text
    table = load_table(synth.config.data.source)
    rng = np.random.default_rng(seed)
    picks = {name: rng.permutation(np.array(synth.split[name]))[:num_records] for name in ("train", "holdout")}
    if len(picks["holdout"]) == 0:
        raise DplmError("the run kept no holdout rows (data.holdout_fraction: 0); membership inference needs them")
    names = synth.schema.names
    if synth.is_history:
        return _audit_histories(synth, run_dir, table, rng, num_records, num_references)
    losses = {name: record_losses(synth, table.iloc[idx][names]) for name, idx in picks.items()}
    result = {"membership_inference": membership_inference(losses["train"], losses["holdout"]),
              "dp": synth.privacy_record.get("dp", False), "epsilon": synth.privacy_record.get("epsilon")}
    canaries, included = read_canaries(run_dir, names)
    if canaries is not None:
        references = random_records(synth.schema, num_references, rng)
        result["canaries"] = canary_scores(lambda records: record_losses(synth, records), canaries, included,
                                           references, synth)
        for col in synth.schema.columns:  # the trained canaries' random word strings alone, given their rows
            if col.kind == "text" and included.any():
                bits = exposure(record_losses(synth, canaries[included], column=col.name),
                                record_losses(synth, references, column=col.name))
                result["canaries"].setdefault("text", {})[col.name] = {"mean_exposure": float(bits.mean()),
                                                                       "max_exposure": float(bits.max())}
    if attribute:
        synthetic = load_table(synthetic_csv, synth.schema.names_of("categorical", "text"))
        rows = {name: align_types(table.iloc[idx][names], synth.schema) for name, idx in picks.items()}
        result["attribute_inference"] = attribute_inference(
            rows["train"], rows["holdout"], align_types(synthetic[names], synth.schema), attribute,
            tuple(synth.schema.names_of("text")), seed)
    RunDirectory(run_dir).write_json("audit.json", result)
    return result


def _audit_histories(synth, run_dir: Path, table: pd.DataFrame, rng, num_records: int, num_references: int) -> dict:
    """The audit of a run of histories, per subject: membership of whole training subjects vs
    holdout subjects (the loss of a whole history), and the exposure of canary subjects (a
    random record as `audit.canary_repeats` rows) among fresh ones made the same way."""
    key = synth.config.data.subject
    columns = [key, *(c for c in synth.schema.names if c in table.columns)]  # subject columns may be in the table
    own = pd.DataFrame()
    if synth.config.data.subjects:
        own = load_table(synth.config.data.subjects)
    losses = {}
    for name in ("train", "holdout"):
        events = table.iloc[synth.split[name]][columns]
        keys = rng.permutation(events[key].unique())[:num_records]
        chosen = events[events[key].isin(set(keys))]
        if len(own):
            chosen = chosen.merge(own, on=key, how="left")
        losses[name] = history_losses(synth, chosen, key)
    if len(losses["holdout"]) == 0:
        raise DplmError("the run kept no holdout subjects (data.holdout_fraction: 0); membership inference needs them")
    result = {"membership_inference": membership_inference(losses["train"], losses["holdout"]), "unit": "subject",
              "dp": synth.privacy_record.get("dp", False), "epsilon": synth.privacy_record.get("epsilon")}
    canaries, included = read_canaries(run_dir, synth.schema.names)
    if canaries is not None:
        repeats = synth.config.audit.canary_repeats

        def as_subjects(records: pd.DataFrame) -> pd.DataFrame:
            rows = pd.concat([records] * repeats, ignore_index=True)
            rows.insert(0, key, np.tile(np.arange(len(records)), repeats))
            return rows.sort_values(key, kind="stable")

        result["canaries"] = canary_scores(lambda records: history_losses(synth, as_subjects(records), key), canaries,
                                           included, random_records(synth.schema, num_references, rng), synth)
    RunDirectory(run_dir).write_json("audit.json", result)
    return result
