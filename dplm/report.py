"""The model report: a self-contained HTML page (charts inlined as PNG) and a JSON of all
metrics, from three DataFrames (training, holdout, synthetic) or from a run directory."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dplm.config import RunConfig
from dplm.data import load_table
from dplm.errors import DplmError
from dplm.evaluate import align_types, evaluate
from dplm.evaluate_histories import gaps, history_scores, ordered_events
from dplm.histories import Histories, subjects_path
from dplm.inputs import history_tables, training_keys
from dplm.rules import history_rules, kept_shares_within, row_rules, suggested, suggested_within
from dplm.schema import Schema
from dplm.synthesizer import Synthesizer
from dplm.tracking import Trackers
from dplm.workspace import RunDirectory

REAL, SYNTHETIC, HOLDOUT = "#1f77b4", "#ff7f0e", "#2ca02c"
PRIVATE_REPORT = ("this report compares the synthetic rows with the private training and holdout rows and shows "
                  "training diagnostics; it is for the data owner and not covered by epsilon. Share the model and "
                  "rows with `dplm export`, which leaves it out.")


# ---- charts ----------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def pyplot():
    """matplotlib's pyplot on its file backend (imported on first use: it takes seconds to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def univariate_charts(train, synthetic, binner) -> str:
    plt = pyplot()
    cols = binner.columns
    ncols = 3
    nrows = math.ceil(len(cols) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    real_codes, syn_codes = binner.codes(train), binner.codes(synthetic)
    for j, c in enumerate(cols):
        ax = axes[j // ncols][j % ncols]
        size = len(binner.labels[c])
        p = np.bincount(real_codes[:, j], minlength=size) / len(real_codes)
        q = np.bincount(syn_codes[:, j], minlength=size) / len(syn_codes)
        x = np.arange(size)
        ax.bar(x - 0.2, p, 0.4, color=REAL, label="real")
        ax.bar(x + 0.2, q, 0.4, color=SYNTHETIC, label="synthetic")
        ax.set_xticks(x, [str(lbl)[:14] for lbl in binner.labels[c]], rotation=60, ha="right", fontsize=7)
        ax.set_title(c, fontsize=10)
    for j in range(len(cols), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def bivariate_charts(train, synthetic, binner, pairs: list[str]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(len(pairs), 2, figsize=(10, 4 * len(pairs)), squeeze=False)
    real_codes, syn_codes = binner.codes(train), binner.codes(synthetic)
    for row, pair in enumerate(pairs):
        a, b = pair.split(" × ")
        i, j = binner.columns.index(a), binner.columns.index(b)
        si, sj = len(binner.labels[a]), len(binner.labels[b])
        for k, (codes, title) in enumerate(((real_codes, "real"), (syn_codes, "synthetic"))):
            grid = np.bincount(codes[:, i] * sj + codes[:, j], minlength=si * sj).reshape(si, sj) / len(codes)
            ax = axes[row][k]
            ax.imshow(grid, cmap="viridis", aspect="auto")
            ax.set_title(f"{title}: {a} × {b}", fontsize=9)
            ax.set_yticks(range(si), [str(x)[:12] for x in binner.labels[a]], fontsize=6)
            ax.set_xticks(range(sj), [str(x)[:12] for x in binner.labels[b]], fontsize=6, rotation=60, ha="right")
    fig.tight_layout()
    return _png(fig)


def accuracy_matrix_chart(acc: dict, columns: list[str]) -> str:
    plt = pyplot()
    n = len(columns)
    grid = np.full((n, n), np.nan)
    for i, c in enumerate(columns):
        grid[i, i] = acc["per_column"][c]
    for key, value in acc["per_pair"].items():
        a, b = key.split(" × ")
        i, j = columns.index(a), columns.index(b)
        grid[i, j] = grid[j, i] = value
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 0.5 * n + 0.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=max(0.0, np.nanmin(grid) - 0.02), vmax=1.0)
    ax.set_xticks(range(n), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), columns, fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=5)
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title("accuracy: univariate (diagonal) and bivariate", fontsize=10)
    return _png(fig)


def embedding_chart(emb: dict) -> str:
    plt = pyplot()
    stacked = np.vstack(list(emb.values()))
    mean = stacked.mean(0)
    _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)
    fig, ax = plt.subplots(figsize=(6, 5))
    for (name, x), color in zip(emb.items(), (REAL, HOLDOUT, SYNTHETIC)):
        xy = (x - mean) @ vt[:2].T
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.35, color=color, label=name)
    ax.legend(markerscale=4)
    ax.set_title("record embeddings (all-MiniLM-L6-v2), first two principal components", fontsize=9)
    return _png(fig)


def dcr_chart(dcr: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max(float(np.percentile(np.concatenate(list(dcr.values())), 99)), 1e-6)
    for (name, d), color in zip(dcr.items(), (SYNTHETIC, HOLDOUT)):
        ax.hist(np.clip(d, 0, top), bins=40, alpha=0.55, color=color, label=name, density=True)
    ax.set_xlabel("distance to closest training record")
    ax.legend()
    return _png(fig)


def training_chart(log: list[dict]) -> str:
    plt = pyplot()
    steps = [e["step"] for e in log]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [e["loss"] if e["loss"] is not None else np.nan for e in log], color=REAL)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color=REAL)
    if any("epsilon" in e for e in log):
        ax2 = ax.twinx()
        ax2.plot(steps, [e.get("epsilon", np.nan) for e in log], color=SYNTHETIC)
        ax2.set_ylabel("epsilon", color=SYNTHETIC)
    ax.set_title("training loss and epsilon per step", fontsize=10)
    return _png(fig)


# ---- the page -------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return html.escape(str(v))


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def summary_rows(metrics: dict) -> list[tuple]:
    """(metric, synthetic, holdout, shuffled columns) rows; the shuffled table scores only where
    it means something (accuracy, embeddings, rules)."""
    acc, emb, priv = metrics["accuracy"], metrics["embedding"], metrics["privacy"]
    rows = [(f"accuracy: {k}", acc["synthetic"][k], acc["holdout"][k], acc.get("shuffled", {}).get(k))
            for k in ("overall", "univariate", "bivariate", "trivariate")]
    rows += [("embedding centroid cosine similarity", emb["centroid_similarity"]["synthetic"],
              emb["centroid_similarity"]["holdout"], emb["centroid_similarity"].get("shuffled")),
             ("discriminator AUC (0.5 = indistinguishable)", emb["discriminator_auc"]["synthetic"],
              emb["discriminator_auc"]["holdout"], emb["discriminator_auc"].get("shuffled")),
             ("DCR share (closer to training than holdout; 0.5 ideal)", priv["synthetic"]["dcr_share"],
              priv["holdout"].get("dcr_share"), None),
             ("median distance to closest training record", priv["synthetic"]["dcr_median"],
              priv["holdout"]["dcr_median"], None),
             ("identical-match share", priv["synthetic"]["identical_match_share"],
              priv["holdout"]["identical_match_share"], None),
             ("rows that exactly copy a training row", priv["synthetic"]["exact_copies_of_training_rows"],
              priv["holdout"]["exact_copies_of_training_rows"], None)]
    rules = metrics.get("rules", {})
    if rules.get("rules"):
        rows.append((f"rows keeping all {len(rules['rules'])} rules of the training rows", rules["synthetic"]["all_rules"],
                     rules["holdout"]["all_rules"], None))
    declared = metrics.get("declared_rules")
    if declared:
        rows.append((f"{declared.get('unit', 'rows')} keeping all {len(declared['rules'])} rules the schema declares",
                     declared["synthetic"]["all_rules"], declared["holdout"]["all_rules"], None))
    return rows


def history_rows(h: dict) -> list[tuple]:
    """The rows of the report's history table."""
    syn, hol = h["synthetic"], h["holdout"]
    rows = [("overall accuracy (flat table + coherence)", syn["overall"], hol["overall"]),
            ("coherence of consecutive rows", syn["coherence"], hol["coherence"])]
    rows += [(f"coherence: {c}", syn["coherence_per_column"][c], hol["coherence_per_column"][c])
             for c in syn["coherence_per_column"]]
    rows += [(f"per subject: {c} (1 - TVD, 10 bins)", syn["per_subject"][c], hol["per_subject"][c])
             for c in syn["per_subject"]]
    rows += [("mean rows per subject (training: " + f"{h['mean_rows_per_subject_training']:.2f})",
              syn["mean_rows_per_subject"], hol["mean_rows_per_subject"])]
    if "gaps" in syn:
        rows.append(("gaps between consecutive rows (1 - TVD)", syn["gaps"], hol["gaps"]))
    rows += [("first rows' accuracy", syn["first_row_accuracy"], hol["first_row_accuracy"]),
             ("later rows' accuracy", syn["later_row_accuracy"], hol["later_row_accuracy"]),
             ("discriminator AUC on whole subjects (0.5 = indistinguishable)", syn["discriminator_auc"],
              hol["discriminator_auc"]),
             ("share of subjects copying a training subject's whole history", syn["copied_subject_share"],
              hol["copied_subject_share"])]
    return rows


def history_charts(h: dict, sets: dict, key: str, order_by: str | None) -> str:
    """Rows per subject and gaps between rows (training, holdout, synthetic), and coherence per column."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3 if order_by else 2, figsize=(15 if order_by else 10, 3.5))
    counts = {name: hs.events.groupby(key).size().reindex(hs.subjects[key]).fillna(0).to_numpy()
              for name, hs in sets.items()}
    top = max(2, int(np.percentile(counts["training"], 99)) + 1)
    bins = np.arange(0, top + 2) - 0.5
    for (name, c), color in zip(counts.items(), (REAL, HOLDOUT, SYNTHETIC)):
        axes[0].hist(np.clip(c, 0, top), bins=bins, density=True, histtype="step", color=color, label=name)
    axes[0].set_title("rows per subject", fontsize=10)
    axes[0].legend(fontsize=8)
    columns = list(h["synthetic"]["coherence_per_column"])
    x = np.arange(len(columns))
    axes[1].bar(x - 0.2, [h["holdout"]["coherence_per_column"][c] for c in columns], 0.4, color=HOLDOUT, label="holdout")
    axes[1].bar(x + 0.2, [h["synthetic"]["coherence_per_column"][c] for c in columns], 0.4, color=SYNTHETIC,
                label="synthetic")
    axes[1].set_xticks(x, columns, rotation=60, ha="right", fontsize=7)
    axes[1].set_ylim(max(0.0, min(h["synthetic"]["coherence_per_column"].values()) - 0.05), 1.0)
    axes[1].set_title("coherence per column", fontsize=10)
    if order_by:
        between = {name: gaps(ordered_events(hs, key, order_by), key, order_by) for name, hs in sets.items()}
        high = float(np.percentile(between["training"], 99)) if len(between["training"]) else 1.0
        for (name, g), color in zip(between.items(), (REAL, HOLDOUT, SYNTHETIC)):
            if len(g):
                axes[2].hist(np.clip(g, 0, high), bins=40, density=True, histtype="step", color=color, label=name)
        axes[2].set_title(f"gaps between consecutive rows ({order_by})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def rule_rows(rules: dict) -> list[tuple]:
    """One row per rule the training rows show: its kind, columns and the share of rows keeping it."""
    return [(f"{r['kind'].replace('_', ' ')}: {' and '.join(r['columns'])}", rules["synthetic"]["per_rule"][i],
             rules["holdout"]["per_rule"][i]) for i, r in enumerate(rules["rules"])]


def declared_rule_rows(declared: dict) -> list[tuple]:
    """One row per rule the schema declares: the share of synthetic and holdout rows keeping it."""
    return [(rule, declared["synthetic"]["per_rule"][i], declared["holdout"]["per_rule"][i])
            for i, rule in enumerate(declared["rules"])]


def text_rows(t: dict) -> list[tuple]:
    """The rows of a text column's table in the report."""
    rows = [("discriminator AUC vs holdout texts (0.5 = indistinguishable)", "discriminator_auc"),
            ("centroid cosine similarity to holdout texts", "centroid_similarity"),
            ("length distribution accuracy (characters)", "length_accuracy"),
            ("fluency: share of words in a public word list (the base tokenizer's whole words)", "known_word_share")]
    if t.get("context"):
        rows.append((f"'{t['context']}' predicted from the text, on the holdout (majority class "
                     f"{t['context_majority_share']:.3f})", "context_accuracy"))
    rows += [("share of texts found verbatim among the training texts", "verbatim_training_share"),
             ("median cosine distance to the nearest training text", "nearest_training_distance_median")]
    return [(label, t["synthetic"][key], t["holdout"][key]) for label, key in rows]


def render_html(metrics: dict, charts: dict, run_info: dict | None) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>dplm model report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}",
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}",
             "td:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}",
             ".private{background:#fff3cd;border:1px solid #e0c060;padding:.6em}</style></head><body>",
             "<h1>dplm model report</h1>",
             f"<p class='private'><b>Private:</b> {html.escape(PRIVATE_REPORT)}</p>"]
    rows = metrics["rows"]
    parts.append(f"<p>{rows['training']:,} training rows, {rows['holdout']:,} holdout rows, "
                 f"{rows['synthetic']:,} synthetic rows. The holdout column scores real unseen rows as if they were "
                 "synthetic: the best a synthesizer can expect. Its accuracy (and the shuffled column's) is "
                 f"measured on {min(rows['holdout'], rows['synthetic']):,} rows, as many as the synthetic rows "
                 "(at most): fewer rows estimate a marginal less closely.</p>")
    parts.append("<p>The shuffled column scores the training rows with every column shuffled on its own: the "
                 "marginals kept, every dependency gone. A synthesizer that learns no dependencies scores there; "
                 "one below it has lost even the marginals.</p>")
    parts.append("<h2>Summary</h2>" + _table(summary_rows(metrics), ("metric", "synthetic", "holdout (reference)",
                                                                     "shuffled columns (floor)")))
    if metrics.get("yardstick"):
        parts.append(f"<p>{html.escape(metrics['yardstick'])}</p>")
    rules = metrics.get("rules", {})
    if rules.get("rules"):
        parts.append("<h2>Hard rules of the training rows</h2><p>Pairs of columns the training rows tie together "
                     "(one-to-one values, or never both non-zero), and the share of rows that keep each. Found in the "
                     "private training rows: a private diagnostic.</p>"
                     + _table(rule_rows(rules), ("rule", "synthetic", "holdout")))
    if metrics.get("declared_rules"):
        unit = metrics["declared_rules"].get("unit", "rows")
        parts.append(f"<h2>Rules the schema declares</h2><p>Kept by construction when sampling; the share of {unit} "
                     f"keeping each, and whether the real {unit} (holdout) keep them.</p>"
                     + _table(declared_rule_rows(metrics["declared_rules"]), ("rule", "synthetic", "holdout")))
    if metrics.get("suggested_rules"):
        parts.append("<h2>Rules you could declare</h2><p>Rules the run's statistics show (under DP: the noisy "
                     "statistics, nothing else) that the schema does not declare. Declared under the schema's "
                     "<code>rules:</code>, every row keeps them:</p><pre>"
                     + html.escape(yaml.safe_dump({"rules": metrics["suggested_rules"]}, sort_keys=False,
                                                  allow_unicode=True)) + "</pre>")
    if "utility" in metrics:
        u = metrics["utility"]
        keys = [k for k in ("accuracy", "roc_auc", "r2") if k in u["trtr"]]
        parts.append(f"<h2>Utility: predicting '{html.escape(u['target'])}' on the holdout</h2>" +
                     _table([(f"trained on {'synthetic (TSTR)' if n == 'tstr' else 'real training rows (TRTR)'}",
                              *[u[n].get(k) for k in keys]) for n in ("tstr", "trtr")], ("model", *keys)))
    if run_info:
        parts.append("<h2>Compute and privacy</h2><p>Epsilon and the DP settings are the run's privacy record "
                     "(privacy.json, shared by <code>dplm export</code>); the step counts, rows, timings and "
                     "losses are training diagnostics from the private batches: for the data owner, not "
                     "covered by epsilon.</p>")
        parts.append(_table([(k, v) for k, v in run_info.get("summary", {}).items()], ("", "value")))
        if "training" in charts:
            parts.append(_img(charts["training"], "loss and epsilon per step"))
        audit = run_info.get("audit")
        if audit:
            mia = audit["membership_inference"]
            rows = [("membership inference AUC (chance 0.5)", mia["auc"]),
                    ("true-positive rate at 1% false positives (chance 0.01)", mia["tpr_at_1pct_fpr"])]
            if "canaries" in audit:
                c = audit["canaries"]
                if "mean_exposure" in c:
                    rows += [(f"canary exposure, mean of the {c.get('training', c['count'])} trained (bits; unseen "
                              f"~1, max {c['max_possible']:.1f})", c["mean_exposure"]),
                             ("canary exposure, max (bits)", c["max_exposure"])]
                if "one_run" in c:
                    o = c["one_run"]
                    rows.append((f"empirical epsilon, a lower bound from one run ({o['confidence']:.0%}; "
                                 f"{o['correct']} of {o['guesses']} guesses right on {o['canaries']} canaries)",
                                 o["epsilon_lower_bound"]))
                    if audit.get("dp"):
                        rows.append(("the accountant's epsilon (an upper bound)", audit["epsilon"]))
                rows += [(f"text canaries in '{column}' (random words, their tokens alone): exposure mean / max "
                          "(bits)", f"{t['mean_exposure']:.2f} / {t['max_exposure']:.2f}")
                         for column, t in c.get("text", {}).items()]
            if "attribute_inference" in audit:
                a = audit["attribute_inference"]
                rows += [(f"attribute inference of '{a['column']}' from the synthetic rows, {attack}: accuracy on "
                          "training / holdout rows", f"{a[key]['accuracy_members']:.3f} / {a[key]['accuracy_non_members']:.3f}")
                         for attack, key in (("nearest row", "nearest_neighbour"), ("classifier", "classifier"),
                                             ("most common value", "majority"))]
                rows.append(("attribute inference advantage (0: no more about members than about anyone)",
                             a["advantage"]))
            parts.append("<h2>Empirical privacy audit (dplm audit)</h2><p>Measured on the private training rows: "
                         "for the data owner, not covered by epsilon.</p>" + _table(rows, ("attack", "value")))
    if "histories" in metrics:
        h = metrics["histories"]
        parts.append("<h2>Histories</h2><p>" + f"{h['subjects']['training']:,} training, {h['subjects']['holdout']:,} "
                     f"holdout and {h['subjects']['synthetic']:,} synthetic subjects. The overall accuracy follows "
                     "mostlyai-qa's for sequences: the mean of the uni-, bi- and trivariate accuracy of one random row "
                     "a subject (with its row count) and the coherence of consecutive rows. The holdout column scores "
                     "real unseen subjects the same way.</p>")
        parts.append(_table(history_rows(h), ("metric", "synthetic", "holdout (reference)")))
        parts.append(_img(charts["histories"], "histories"))
    for column, t in metrics.get("text", {}).items():
        parts.append(f"<h2>Text column '{html.escape(column)}'</h2>")
        if "note" in t:
            parts.append(f"<p>{html.escape(t['note'])}</p>")
            continue
        parts.append(f"<p>{t['texts_scored']:,} texts per set (missing texts left out). The reference column scores "
                     "real training texts the same way: against the holdout's texts, and for memorization the "
                     "holdout's own texts against the training texts.</p>")
        parts.append(_table(text_rows(t), ("metric", "synthetic", "real (reference)")))
    parts.append("<h2>Accuracy matrix</h2>" + _img(charts["accuracy_matrix"], "accuracy matrix"))
    parts.append("<h2>Univariate distributions, real vs synthetic</h2>" + _img(charts["univariate"], "univariate"))
    parts.append("<h2>Bivariate distributions: the three least accurate pairs</h2>" +
                 _img(charts["bivariate"], "bivariate"))
    parts.append("<h2>Embedding space</h2>" + _img(charts["embedding"], "embeddings"))
    parts.append("<h2>Distance to closest training record</h2>" + _img(charts["dcr"], "DCR"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, out_dir: str | Path,
                 target: str | None = None, run_info: dict | None = None, seed: int = 0,
                 text_columns: list[str] | None = None, categorical: list[str] | None = None,
                 histories: tuple | None = None, declared: list | None = None,
                 suggestions: list[dict] | None = None) -> tuple[Path, Path]:
    """Score and write `report.html` and `report.json` into `out_dir`; returns their paths.
    `text_columns` get a text section each, whose utility predicts one of `categorical`.
    `histories` = (sets, key, order_by), `sets` the training, holdout and synthetic
    `histories.Histories`: a section of history scores (`evaluate_histories`); the other scores
    are then those of the event rows. `declared`: the schema's rules, a share of rows keeping
    each; `suggestions`: the rules the run's statistics show that it does not declare."""
    start = time.perf_counter()
    metrics = evaluate(train, holdout, synthetic, target=target, seed=seed, text_columns=text_columns,
                       categorical=categorical, declared=row_rules(declared or []))
    if suggestions:
        metrics["suggested_rules"] = suggestions
    if histories:
        sets, key, order_by = histories
        metrics["histories"] = history_scores(sets["training"], sets["holdout"], sets["synthetic"], key, order_by,
                                              seed=seed)
        if history_rules(declared or []):  # each subject keeps them, or not
            metrics["declared_rules"] = kept_shares_within(declared, sets["holdout"].events,
                                                           sets["synthetic"].events, key)
    binner = metrics["_binner"]
    acc = metrics["accuracy"]["synthetic"]
    worst = sorted(acc["per_pair"], key=acc["per_pair"].get)[:3]
    charts = {
        "univariate": univariate_charts(train, synthetic, binner),
        "bivariate": bivariate_charts(train, synthetic, binner, worst) if worst else "",
        "accuracy_matrix": accuracy_matrix_chart(acc, binner.columns),
        "embedding": embedding_chart(metrics["_embeddings"]),
        "dcr": dcr_chart(metrics["_dcr"]),
    }
    if run_info and run_info.get("log"):
        charts["training"] = training_chart(run_info["log"])
    if histories:
        charts["histories"] = history_charts(metrics["histories"], histories[0], histories[1], histories[2])
    scores = {"private": PRIVATE_REPORT, **{k: v for k, v in metrics.items() if not k.startswith("_")}}
    scores["report_seconds"] = time.perf_counter() - start
    if run_info:
        scores["run"] = run_info.get("summary", {})
        if run_info.get("audit"):
            scores["audit"] = run_info["audit"]
    out = RunDirectory(out_dir)
    out.path.mkdir(parents=True, exist_ok=True)
    json_path = out.write_json("report.json", scores)
    return out.write_text("report.html", render_html(scores, charts, run_info)), json_path


# ---- from a run directory ---------------------------------------------------------------

def headline_scores(metrics: dict) -> dict:
    """The report's main figures as one flat mapping (for trackers and sweeps)."""
    acc = metrics["accuracy"]["synthetic"]
    out = {"accuracy": acc["overall"], **{f"accuracy_{k}": acc[k] for k in ("univariate", "bivariate", "trivariate")},
           "holdout_accuracy": metrics["accuracy"]["holdout"]["overall"],
           "discriminator_auc": metrics["embedding"]["discriminator_auc"]["synthetic"],
           "centroid_similarity": metrics["embedding"]["centroid_similarity"]["synthetic"],
           "dcr_share": metrics["privacy"]["synthetic"]["dcr_share"]}
    for name in ("tstr", "trtr"):
        for k, v in metrics.get("utility", {}).get(name, {}).items():
            if k in ("accuracy", "roc_auc", "r2"):
                out[f"{name}_{k}"] = v
    return out


def run_info(run: RunDirectory) -> dict:
    """Compute and privacy figures of a run, for the report."""
    training, privacy, log = run.json("training.json", {}), run.json("privacy.json"), run.train_log()
    summary = {k: training.get(k) for k in ("seconds", "steps", "epochs", "rows_seen", "tokens_seen",
                                            "rows_per_second", "stop_reason")}
    summary["dp"] = privacy.get("dp", False)
    if privacy.get("dp"):
        summary.update({k: privacy.get(k) for k in ("epsilon", "delta", "noise_multiplier", "max_grad_norm",
                                                    "sample_rate", "accountant", "privacy_unit")})
    return {"summary": summary, "log": log, "audit": run.json("audit.json")}


def history_sets(config: RunConfig, parts: tuple[Schema, Schema], split: dict, table: pd.DataFrame,
                 synthetic: Path | None, sample) -> dict:
    """The training, holdout and synthetic subjects of a run of histories (`histories.Histories`,
    typed by the run's subject and event schemas, `parts`): the synthetic ones from `synthetic`
    (its subject table beside it), or `sample(n)` of them (by default as many as the holdout's)."""
    key, (subject_schema, event_schema) = config.data.subject, parts
    table, subject_table = history_tables(table, None, config)
    train_keys = None
    if subject_table is not None:  # subjects without events are on their side of the split too
        train_keys = training_keys(table, config, subject_table)

    def real(index, training: bool):
        events = table.iloc[index]
        subjects = pd.DataFrame({key: events[key].unique()})
        if subject_table is not None:
            subjects = subject_table[subject_table[key].isin(train_keys) == training]
        return Histories(typed(subjects, key, subject_schema), typed(events, key, event_schema))

    sets = {"training": real(split["train"], True), "holdout": real(split["holdout"], False)}
    if synthetic is None:
        sets["synthetic"] = sample(len(sets["holdout"]))
    else:
        events = load_table(synthetic, event_schema.names_of("categorical", "text"))
        own = subjects_path(synthetic)
        subjects = load_table(own, subject_schema.names_of("categorical", "text")) if own.exists() else \
            pd.DataFrame({key: events[key].unique()})
        missing = [c for c in [key, *event_schema.names] if c not in events.columns]
        if missing:
            raise DplmError(f"synthetic file '{synthetic}' lacks column(s) {missing}; give a file with the run's "
                            "subject key and event columns")
        sets["synthetic"] = Histories(typed(subjects, key, subject_schema), typed(events, key, event_schema))
    return sets


def typed(df: pd.DataFrame, key: str, schema) -> pd.DataFrame:
    """`df`'s key and the schema's columns, with the schema's value types (`align_types`)."""
    out = align_types(df, schema) if schema.columns else pd.DataFrame(index=range(len(df)))
    out.insert(0, key, df[key].to_numpy())
    return out


def report_run(run_dir: str | Path, synthetic: str | Path | None = None, num_rows: int | None = None,
               target: str | None = None, out_dir: str | Path | None = None,
               progress: bool = True) -> tuple[Path, Path]:
    """The report of a run directory: its training rows and holdout (from `split.json` and the
    data source in its config) against synthetic rows (a CSV, the run's `synthetic.csv`, or
    `num_rows` freshly sampled, by default as many as the holdout). The model is loaded only to
    sample."""
    run = RunDirectory(run_dir).check()
    run_dir, config, schema, split = run.path, run.config(), run.schema(), run.json("split.json")
    if not split:
        raise DplmError(f"run directory '{run_dir}' has no split.json; retrain with a current dplm")
    if config.data.source is None:
        raise DplmError(f"run '{run_dir}' was fitted on an in-memory table; score it with "
                        "dplm.report.write_report(train, holdout, synthetic, out_dir)")
    table = load_table(config.data.source)
    if len(split["holdout"]) == 0:
        raise DplmError("the run kept no holdout rows (data.holdout_fraction: 0); the report needs a holdout")
    synthetic = Path(synthetic) if synthetic else run_dir / "synthetic.csv"
    if num_rows is None and not synthetic.exists() and synthetic != run_dir / "synthetic.csv":
        raise DplmError(f"synthetic file '{synthetic}' not found; check the path")
    fresh = num_rows is not None or not synthetic.exists()

    def sample(n: int):
        return Synthesizer.load(run_dir).sample(num_rows or n, progress=progress)

    info = run_info(run)
    common = {"target": target, "run_info": info, "seed": config.train.seed}
    parts = run.history_schemas()
    if parts:
        sets = history_sets(config, parts, split, table, None if fresh else synthetic, sample)
        events = parts[1]
        names = [n for n in schema.output_order or schema.names if n in events.names]  # as for flat rows, below
        rows = {name: align_types(h.events, events)[names] for name, h in sets.items()}
        # Without DP the rules within a history that the training subjects show (exact rows); none under DP.
        training = sets["training"].events
        suggestions = [] if config.privacy.enabled else suggested_within(
            training, training[config.data.subject].to_numpy(), {c.name: c.kind for c in events.columns},
            config.data.order_by, schema.rules)
        paths = write_report(rows["training"], rows["holdout"], rows["synthetic"], Path(out_dir or run_dir),
                             text_columns=events.names_of("text"), categorical=events.names_of("categorical"),
                             histories=(sets, config.data.subject, config.data.order_by), declared=schema.rules,
                             suggestions=suggestions, **{**common, "target": target if target in events.names else None})
    else:
        # In the table's column order (not the model's, which the statistics choose): the holdout's and
        # the shuffled columns' figures are then the same for every run on the same split.
        names = schema.output_order or schema.names
        train = align_types(table.iloc[split["train"]], schema)[names]
        holdout = align_types(table.iloc[split["holdout"]], schema)[names]
        if not fresh:
            fake = load_table(synthetic, schema.names_of("categorical", "text"))
            missing = [c for c in schema.names if c not in fake.columns]
            if missing:
                raise DplmError(f"synthetic file '{synthetic}' lacks column(s) {missing}; give a file with the run's "
                                "columns")
        else:
            fake = sample(len(holdout))
        marginals = run.marginals()
        found = marginals.rules().to_dict() if marginals else {}
        paths = write_report(train, holdout, align_types(fake, schema)[names], Path(out_dir or run_dir),
                             text_columns=schema.names_of("text"), categorical=schema.names_of("categorical"),
                             declared=schema.rules, suggestions=suggested(found, schema.rules), **common)
    if config.train.report_to and run.has("tracking.json"):
        trackers = Trackers(config, run.json("tracking.json"))
        try:
            trackers.log({"report": headline_scores(json.loads(paths[1].read_text()))}, info["summary"]["steps"] or 0)
        finally:
            trackers.finish()
    return paths
