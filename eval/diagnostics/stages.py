"""One markdown row per model from eval.score and eval.diagnostics.likelihood outputs: the model card's per-stage table.

Usage:
    python -m eval.diagnostics.stages base=outputs/starter/eval_base stage1=outputs/starter/eval_stage1_align ...

Each DIR holds metrics.json (eval.score, one run) and optionally nll_captions.json and nll_instruct.json
(eval.diagnostics.likelihood --output). Columns: questions scored, strict and LLaVA-Med closed accuracy, strict open exact
match, LLaVA-Med open recall, strict open token F1 (each with its bootstrap 95% interval), strict accuracy on
the MODALITY questions (closed and open together), and the two held-out NLLs per assistant token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.score import percent_cell
from medllava.reports import markdown_table

COLUMNS = (
    "model",
    "n",
    "strict closed acc",
    "LLaVA-Med closed acc",
    "open exact match (strict)",
    "LLaVA-Med open recall",
    "open token F1",
    "modality acc (strict)",
    "caption NLL",
    "conversation NLL",
)
STRICT = {"CLOSED": "strict_closed_accuracy", "OPEN": "strict_exact_match"}


def _nll(path: Path) -> str:
    return f"{json.loads(path.read_text())['nll']:.3f}" if path.is_file() else "-"


def stage_row(name: str, directory: Path) -> list[str]:
    runs = json.loads((directory / "metrics.json").read_text())["runs"]
    if len(runs) != 1:
        raise ValueError(f"{directory}/metrics.json holds {len(runs)} runs; score one model per directory")
    run = next(iter(runs.values()))
    closed = run["by_answer_type"].get("CLOSED", {})
    opened = run["by_answer_type"].get("OPEN", {})
    modality = run.get("by_question_type", {}).get("MODALITY", {})
    hits = sum(m[STRICT[t]]["mean"] * m[STRICT[t]]["n"] for t, m in modality.items() if STRICT.get(t) in m)
    count = sum(m[STRICT[t]]["n"] for t, m in modality.items() if STRICT.get(t) in m)
    return [
        name,
        str(run["n"]),
        percent_cell(closed.get("strict_closed_accuracy"), 0),
        percent_cell(closed.get("llava_closed_accuracy"), 0),
        percent_cell(opened.get("strict_exact_match"), 0),
        percent_cell(opened.get("llava_recall"), 0),
        percent_cell(opened.get("strict_token_f1"), 0),
        f"{100 * hits / count:.1f}" if count else "-",
        _nll(directory / "nll_captions.json"),
        _nll(directory / "nll_instruct.json"),
    ]


def table(stages: list[tuple[str, Path]]) -> str:
    return markdown_table(COLUMNS, [stage_row(name, directory) for name, directory in stages])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.diagnostics.stages", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("stages", nargs="+", metavar="NAME=DIR", help="a row name and its eval directory")
    args = parser.parse_args(argv)
    stages = []
    for spec in args.stages:
        name, sep, directory = spec.rpartition("=")
        if not sep or not Path(directory, "metrics.json").is_file():
            parser.error(f"{spec!r}: expected NAME=DIR with DIR/metrics.json (from eval.score)")
        stages.append((name, Path(directory)))
    print(table(stages))


if __name__ == "__main__":
    main()
