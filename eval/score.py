"""Score prediction files (from eval.generate) into metrics.json, a markdown table and a bar chart; no model runs.

Usage:
    python -m eval.score --predictions outputs/eval/predictions.jsonl --output outputs/eval
    python -m eval.score --predictions base.jsonl tuned.jsonl --names base tuned --output outputs/compare
    python -m eval.score --predictions shard0.jsonl,shard1.jsonl --output DIR   # comma-joined files = one run

Every metric comes from the registry in `medllava.metrics` (LLaVA-Med-compatible `llava_*` and `strict_*`),
averaged over the questions of the answer types it applies to, overall and per question type and modality,
with seeded bootstrap 95% confidence intervals. When rows carry several images or `image_roles` (eval.generate
records `n_images` and `image_roles`), also per image family: single image, longitudinal (a prior image among
them) and volume (several images, none a prior: the slices of a volume). Writes DIR/metrics.json,
DIR/metrics.md (also printed) and DIR/metrics.png. Several runs are put side by side.

`--protocol NAME[,NAME...]` (or `all`) also scores each run the way another harness does (eval.protocols: ours,
llava_med, medevalkit, lmms_eval, vlmevalkit, medgemma; the dataset variant is taken from each row's `source`):
closed / open / overall per protocol, each harness's own split, in metrics.json and a table of metrics.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval.protocols import PROTOCOLS, get_protocols, notes_of, score_protocol, split_values
from medllava.metrics import ACCURACY_METRIC, ANSWER_TYPE_METRICS, LABELS, infer_answer_type, score
from medllava.schema import SchemaError, read_jsonl, write_json

# The metrics shown in the headline table and chart, per answer type: LLaVA-Med-compatible first, then strict.
HEADLINE = {
    "CLOSED": ("llava_closed_accuracy", "llava_closed_accuracy_yn", "strict_closed_accuracy"),
    "OPEN": (
        "llava_recall",
        "llava_f1",
        "llava_exact_match",
        "llava_bleu1",
        "strict_exact_match",
        "strict_token_f1",
    ),
    "CHOICE": ("strict_choice_accuracy",),
}
LENIENT = {"CLOSED": "llava_closed_accuracy", "OPEN": "llava_recall"}  # LLaVA-Med's paper numbers
BREAKDOWNS = ("question_type", "modality")
# What a question shows, from its image count and roles (image_family); the family breakdown is added when
# a run has rows of more than one image or with image_roles.
FAMILIES = ("single image", "longitudinal", "volume", "no image")


def image_family(n_images: int | None, roles: list | None = None) -> str | None:
    """The family of a question's images: "longitudinal" when one is a prior study, "volume" for several
    images none of which is a prior (the slices of one volume), "single image" or "no image"; None when the
    count is unknown."""
    if n_images is None:
        return None
    if roles and "prior" in roles:
        return "longitudinal"
    return "volume" if n_images > 1 else "single image" if n_images == 1 else "no image"


def row_family(row: dict) -> str | None:
    roles = row.get("image_roles")
    n_images = row.get("n_images")
    return image_family(len(roles) if n_images is None and roles else n_images, roles)


# ---------------------------------------------------------------------------------------------------------------
# Reading and scoring
# ---------------------------------------------------------------------------------------------------------------


def read_predictions(paths: list[Path]) -> tuple[list[dict], dict]:
    """Prediction rows of one run (one or more files) and counts of what needed attention."""
    rows, seen, notes = [], {}, Counter()
    kinds = {type(None): "null", bool: "boolean", int: "number", float: "number", list: "array"}
    for path in paths:
        for line_no, row in read_jsonl(path):
            where = f"{path}:{line_no}"
            missing = [k for k in ("id", "answer", "prediction") if k not in row]
            if missing:
                raise SchemaError(f"{where}: prediction row without {', '.join(missing)}")
            # Text fields must be strings (the optional ones may be null): a null prediction or a numeric answer
            # is a broken file, not something to score.
            optional = ("answer_type", "question_type", "modality", "source", "question")
            wrong = [
                f"{k!r} must be a string, got {kinds.get(type(row[k]), 'object')}"
                for k in ("id", "answer", "prediction", *optional)
                if k in row and not isinstance(row[k], str) and not (k in optional and row[k] is None)
            ]
            n_images, roles = row.get("n_images"), row.get("image_roles")
            if n_images is not None and (type(n_images) is not int or n_images < 0):
                wrong.append(f"'n_images' must be a count of images, got {n_images!r:.40}")
            if roles is not None and (
                not isinstance(roles, list) or not all(r is None or isinstance(r, str) for r in roles)
            ):
                wrong.append("'image_roles' must be a list of role names (or null) per image")
            elif roles is not None and n_images is not None and len(roles) != n_images:
                wrong.append(f"'image_roles' has {len(roles)} entries for {n_images} image(s)")
            if wrong:
                raise SchemaError(f"{where}: {'; '.join(wrong)}")
            if row["id"] in seen:
                raise SchemaError(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
            seen[row["id"]] = where
            if row.get("answer_type") not in ANSWER_TYPE_METRICS:
                if row.get("answer_type") is not None:
                    notes["unknown_answer_type"] += 1
                row = {**row, "answer_type": infer_answer_type(row["answer"])}
                notes["answer_type_inferred"] += 1
            if row.get("error"):
                notes["generation_errors"] += 1
            rows.append(row)
    if not rows:
        raise SchemaError(f"{', '.join(map(str, paths))}: no predictions")
    return rows, dict(notes)


def score_rows(rows: list[dict], desc: str = "scoring") -> list[dict]:
    """Per-question {metric: value}, plus `accuracy` (the default strict accuracy of its answer type)."""
    out = []
    for row in tqdm(rows, desc=desc, unit="q", disable=len(rows) < 2000):
        values = score(str(row["prediction"] or ""), str(row["answer"]), row["answer_type"])
        values["accuracy"] = values[ACCURACY_METRIC[row["answer_type"]]]
        out.append(values)
    return out


def bootstrap_ci(values: np.ndarray, seed: int, n_boot: int) -> tuple[float, float]:
    """Percentile 95% interval of the mean by resampling questions with replacement. The same seed draws the
    same resamples for every metric of a group, so metrics with equal per-question values get equal intervals."""
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # chunks keep memory at 256 x n floats
        stop = min(start + 256, n_boot)
        means[start:stop] = values[rng.integers(0, len(values), (stop - start, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(scores: list[dict], names: tuple[str, ...], seed: int, n_boot: int) -> dict:
    """{metric: {mean, ci95, n}} over a group of questions (all of which have these metrics)."""
    out = {}
    for name in names:
        values = np.array([s[name] for s in scores], dtype=np.float64)
        low, high = bootstrap_ci(values, seed, n_boot)
        out[name] = {"mean": float(values.mean()), "ci95": [low, high], "n": len(values)}
    return out


def by_answer_type(rows: list[dict], scores: list[dict], seed: int, n_boot: int) -> dict:
    result = {}
    for answer_type, names in ANSWER_TYPE_METRICS.items():
        group = [s for r, s in zip(rows, scores, strict=True) if r["answer_type"] == answer_type]
        if group:
            result[answer_type] = summarise(group, names + ("accuracy",), seed, n_boot)
    return result


def mean_ci(values, seed: int, n_boot: int) -> dict | None:
    """{mean, ci95, n} of per-question values (None when there are none)."""
    if values is None or len(values) == 0:
        return None
    arr = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(arr, seed, n_boot)
    return {"mean": float(arr.mean()), "ci95": [low, high], "n": len(arr)}


def protocol_summary(
    rows: list[dict], protocols: str, seed: int, n_boot: int, dataset: str | None = None
) -> dict:
    """{protocol: {closed, open, overall, notes}} under each harness's rules (eval.protocols)."""
    out = {}
    for protocol in get_protocols(protocols):
        scores = score_protocol(protocol, rows, dataset)
        values = split_values(scores)
        out[protocol.name] = {
            key: mean_ci(values[key], seed, n_boot) for key in ("closed", "open", "overall")
        }
        out[protocol.name]["notes"] = notes_of(scores)
    return out


def protocol_markdown(runs: dict) -> list[str]:
    """Rows of the per-protocol table (empty when no run was scored with --protocol)."""
    names = [n for n in runs if runs[n].get("protocols")]
    if not names:
        return []
    lines = [
        "",
        "### Under each harness's protocol (%, bootstrap 95% CI; closed/open as each harness splits them)",
        "",
    ]
    lines += ["| protocol | split | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for protocol in runs[names[0]]["protocols"]:
        for split in ("closed", "open", "overall"):
            cells = [runs[n]["protocols"].get(protocol, {}).get(split) for n in names]
            text = [percent_cell(c) + (f" (n={c['n']})" if c else "") for c in cells]
            lines.append(f"| {PROTOCOLS[protocol].title} | {split} | " + " | ".join(text) + " |")
    return lines


def evaluate_run(rows: list[dict], seed: int = 0, n_boot: int = 1000) -> dict:
    """Metrics of one run: overall accuracy, per answer type, and per question type / modality."""
    scores = score_rows(rows)
    result = {
        "n": len(rows),
        "n_by_answer_type": dict(Counter(r["answer_type"] for r in rows)),
        "all": summarise(scores, ("accuracy",), seed, n_boot),
        "by_answer_type": by_answer_type(rows, scores, seed, n_boot),
    }
    for key in BREAKDOWNS:
        values = sorted({str(r.get(key)) for r in rows if r.get(key) is not None})
        result[f"by_{key}"] = {}
        for value in values:
            pairs = [(r, s) for r, s in zip(rows, scores, strict=True) if str(r.get(key)) == value]
            result[f"by_{key}"][value] = by_answer_type(
                [p[0] for p in pairs], [p[1] for p in pairs], seed, n_boot
            )
        result[f"without_{key}"] = sum(r.get(key) is None for r in rows)
    if any((r.get("n_images") or 0) > 1 or r.get("image_roles") for r in rows):
        families = [row_family(r) for r in rows]
        result["by_image_family"] = {}
        for family in [f for f in FAMILIES if f in families]:
            pairs = [(r, s) for r, s, f in zip(rows, scores, families, strict=True) if f == family]
            group_rows, group_scores = [p[0] for p in pairs], [p[1] for p in pairs]
            result["by_image_family"][family] = {
                **by_answer_type(group_rows, group_scores, seed, n_boot),
                "all": summarise(group_scores, ("accuracy",), seed, n_boot),
            }
        result["without_image_family"] = families.count(None)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def percent_cell(entry: dict | None, ci_decimals: int = 1) -> str:
    """A metric entry as "mean [low, high]" in percent; "-" when there is none."""
    if not entry:
        return "-"
    low, high = entry["ci95"]
    return f"{100 * entry['mean']:.1f} [{100 * low:.{ci_decimals}f}, {100 * high:.{ci_decimals}f}]"


def markdown(report: dict) -> str:
    runs = report["runs"]
    names = list(runs)
    lines = ["## VQA metrics (%, bootstrap 95% CI; greedy decoding)", ""]
    lines += [
        "| answer type | metric | kind | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    lines.append(
        "| all | accuracy (strict; token F1 for open) | strict | "
        + " | ".join(percent_cell(runs[n]["all"]["accuracy"]) for n in names)
        + " |"
    )
    for answer_type, metric_names in HEADLINE.items():
        if not any(answer_type in runs[n]["by_answer_type"] for n in names):
            continue
        counts = "/".join(str(runs[n]["n_by_answer_type"].get(answer_type, 0)) for n in names)
        for metric in metric_names:
            kind = "LLaVA-Med-compatible" if metric.startswith("llava_") else "strict"
            cells = [percent_cell(runs[n]["by_answer_type"].get(answer_type, {}).get(metric)) for n in names]
            lines.append(
                f"| {answer_type} (n={counts}) | {LABELS[metric]} | {kind} | " + " | ".join(cells) + " |"
            )
    for key in (*BREAKDOWNS, "image_family"):
        groups = sorted({g for n in names for g in runs[n].get(f"by_{key}", {})})
        if key == "image_family":
            groups = [f for f in FAMILIES if f in groups]
        if not groups:
            continue
        lines += [
            "",
            f"### By {key.replace('_', ' ')} (LLaVA-Med: closed accuracy / open recall; strict: default "
            "accuracy)",
            "",
        ]
        header = " | ".join(f"{n} LLaVA-Med | {n} strict" for n in names)
        lines += [f"| {key} | answer type | n | {header} |", "|---|---|---|" + "---|---|" * len(names)]
        for group in groups:
            # "all" (every answer type: strict accuracy) is there for the image families only
            for answer_type in (*ANSWER_TYPE_METRICS, "all"):
                entries = [runs[n].get(f"by_{key}", {}).get(group, {}).get(answer_type) for n in names]
                if not any(entries):
                    continue
                n_q = "/".join(str(e["accuracy"]["n"]) if e else "0" for e in entries)
                cells = []
                for e in entries:
                    lenient = LENIENT.get(answer_type)
                    cells.append(percent_cell(e.get(lenient)) if e and lenient else "-")
                    cells.append(percent_cell(e["accuracy"]) if e else "-")
                lines.append(f"| {group} | {answer_type} | {n_q} | " + " | ".join(cells) + " |")
    notes = [
        f"{n}: {', '.join(f'{k} {v}' for k, v in runs[n]['notes'].items())}"
        for n in names
        if runs[n]["notes"]
    ]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    lines += protocol_markdown(runs)
    if report.get("unpaired"):
        lines += ["", f"Warning: {report['unpaired']}"]
    lines += [
        "",
        "LLaVA-Med-compatible metrics follow LLaVA-Med's run_eval scripts (lenient: substring matches, "
        "recall rewards long answers); strict ones need the exact answer (see medllava/metrics.py).",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = list(runs)
    bars = [
        (t, m) for t, ms in HEADLINE.items() for m in ms if any(t in runs[n]["by_answer_type"] for n in names)
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(bars) * max(1, len(names)) ** 0.5), 4.5))
    width = 0.8 / len(names)
    x = np.arange(len(bars))
    for i, name in enumerate(names):
        entries = [runs[name]["by_answer_type"].get(t, {}).get(m) for t, m in bars]
        means = np.array([100 * e["mean"] if e else 0.0 for e in entries])
        low = np.array([100 * (e["mean"] - e["ci95"][0]) if e else 0.0 for e in entries])
        high = np.array([100 * (e["ci95"][1] - e["mean"]) if e else 0.0 for e in entries])
        ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=[low, high], capsize=3, label=name)
    ax.set_xticks(x, [f"{t}\n{LABELS[m]}" for t, m in bars], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("% (95% bootstrap CI)")
    ax.set_ylim(0, 100)
    ax.set_title("VQA: LLaVA-Med-compatible (llava) vs strict metrics")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _default_name(path: Path) -> str:
    """The file name, or the directory's for the usual DIR/predictions.jsonl."""
    return path.parent.name if path.stem == "predictions" and path.parent.name else path.stem


def run_names(specs: list[str], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(specs):
            raise ValueError(f"--names has {len(names)} name(s) for {len(specs)} prediction run(s)")
        chosen = names
    else:
        chosen = [_default_name(Path(s.split(",")[0])) for s in specs]
        if len(set(chosen)) < len(chosen):
            chosen = [str(Path(s.split(",")[0]).with_suffix("")) for s in specs]
    if len(set(chosen)) < len(chosen):
        raise ValueError(f"run names are not unique: {chosen}; pass --names")
    return chosen


def score_files(
    specs: list[str],
    output: Path,
    names: list[str] | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    protocols: str | None = None,
) -> dict:
    report = {"seed": seed, "bootstrap_samples": n_boot, "runs": {}}
    id_sets = []
    for name, spec in zip(run_names(specs, names), specs, strict=True):
        paths = [Path(p) for p in spec.split(",") if p]
        rows, notes = read_predictions(paths)
        id_sets.append({r["id"] for r in rows})
        report["runs"][name] = {
            "files": [str(p) for p in paths],
            "notes": notes,
            **evaluate_run(rows, seed, n_boot),
        }
        if protocols:
            report["runs"][name]["protocols"] = protocol_summary(rows, protocols, seed, n_boot)
    if len(id_sets) > 1 and any(s != id_sets[0] for s in id_sets[1:]):
        report["unpaired"] = "the runs answer different sets of questions; compare their numbers with care"
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "metrics.json", report)
    table = markdown(report)
    (output / "metrics.md").write_text(table, encoding="utf-8")
    plot(report, output / "metrics.png")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m eval.score",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        help="prediction JSONL file(s), one run each; comma-join files of one run (shards)",
    )
    p.add_argument("--output", required=True, help="directory for metrics.json, metrics.md and metrics.png")
    p.add_argument("--names", nargs="+", help="a name per run (default: the file names)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument(
        "--protocol",
        metavar="NAME[,NAME...]",
        help=f"also score under these harness protocols ({', '.join(PROTOCOLS)}, or 'all')",
    )
    args = p.parse_args(argv)
    if args.bootstrap < 1:
        p.error("--bootstrap must be >= 1")
    if args.protocol:
        try:
            get_protocols(args.protocol)
        except ValueError as e:
            p.error(f"--protocol: {e}")
    try:
        score_files(args.predictions, Path(args.output), args.names, args.seed, args.bootstrap, args.protocol)
    except (SchemaError, ValueError) as e:
        sys.exit(f"eval.score: error: {e}")
    print((Path(args.output) / "metrics.md").read_text(encoding="utf-8"), end="")
    print(f"wrote {args.output}/metrics.json, metrics.md, metrics.png", file=sys.stderr)


if __name__ == "__main__":
    main()
