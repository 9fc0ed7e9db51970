"""Does a model's yes/no answer depend on the image? First-token preference on closed questions, as ROC AUC.

Greedy accuracy on yes/no questions hides how far a model is from answering them: a model that says "no" to
everything and one that ranks yes-questions above no-questions but with a bias both score 50%. For every CLOSED
question this scores s = log P("yes") - log P("no") for the first answer token after eval's prompt (same
suffix, "Answer yes or no.", as `make eval`), and reports per question type:

- `auc`: the ROC AUC of s against the true answer (0.5: s carries nothing about the answer; 1: it ranks every
  yes-question above every no-question);
- `best_threshold_acc`: the accuracy of the best single threshold on s, fitted on the same questions (an
  optimistic ceiling for a bias correction, not a held-out score);
- `acc_at_0`: greedy's choice between the two words (s >= 0 means "yes");
- `yes_no_mass`: the mean probability the first token puts on "yes" or "no" together.

`--tell` puts a sentence built from each row's fields before the question, e.g. `--tell "This is a {modality}
image."`: if the AUC stays near 0.5 when the model is told the fact in words, the failure is in comparing the
question with the fact, not in seeing it.

Usage:
    python -m eval.diagnostics.yesno --model default --data data/medsynth/vqa_val.jsonl
    python -m eval.diagnostics.yesno --model outputs/starter/dpo --data data/medsynth/vqa_val.jsonl --output outputs/yesno.json
    python -m eval.diagnostics.yesno --model default --tell "This is a {modality} image."
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from eval.generate import load_questions
from medllava.assets import resolve_model
from medllava.prompts import ANSWER_SUFFIXES, with_prefix
from medllava.reports import markdown_table
from medllava.schema import SchemaError, read_jsonl


def roc_auc(scores: list[float], positive: list[bool]) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half); None without both."""
    pos = torch.tensor([s for s, p in zip(scores, positive, strict=True) if p])
    neg = torch.tensor([s for s, p in zip(scores, positive, strict=True) if not p])
    if not len(pos) or not len(neg):
        return None
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def best_threshold_accuracy(scores: list[float], positive: list[bool]) -> float:
    """Accuracy of the best rule "yes iff score >= t" over every threshold t (fitted on these rows)."""
    order = sorted(set(scores)) + [float("inf")]
    return max(sum((s >= t) == p for s, p in zip(scores, positive, strict=True)) / len(scores) for t in order)


def word_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"{word!r} is not one token for this tokenizer ({ids}): the first-token score needs it"
        )
    return ids[0]


@torch.inference_mode()
def yes_no_scores(model, processor, questions, batch_size: int = 16) -> list[tuple[float, float]]:
    """(log P(yes) - log P(no), P(yes) + P(no)) of the first answer token, per question."""
    from medllava.generation import _model_inputs
    from medllava.processing import load_image

    yes, no = word_token(processor.tokenizer, "yes"), word_token(processor.tokenizer, "no")
    out = []
    for start in tqdm(range(0, len(questions), batch_size), desc="scoring", unit="batch"):
        batch = questions[start : start + batch_size]
        examples = [{"images": [load_image(p) for p in q.images], "messages": q.messages} for q in batch]
        inputs = _model_inputs(
            model, processor, examples, images_loaded=True
        )  # left-padded: last = next token
        logp = model(**inputs).logits[:, -1].float().log_softmax(-1)
        for row in logp:
            out.append((float(row[yes] - row[no]), float(row[yes].exp() + row[no].exp())))
    return out


def tell(questions, data: Path, template: str) -> list:
    """Each question with `template`, formatted with its row's fields, put before the question's text."""
    rows = {row["id"]: (line, row) for line, row in read_jsonl(data)}
    told = []
    for q in questions:
        line, row = rows[q.id]
        try:
            sentence = template.format_map(row)
        except KeyError as e:
            raise SchemaError(
                f"{data}:{line}: --tell needs the field {e.args[0]!r}, which this row lacks"
            ) from None
        told.append(dataclasses.replace(q, messages=with_prefix(q.messages, sentence)))
    return told


def summarise(questions, scores) -> dict:
    groups = defaultdict(list)
    for q, (s, mass) in zip(questions, scores, strict=True):
        truth = q.answer.strip().lower()
        if truth not in ("yes", "no"):
            continue
        for key in ("ALL", q.metadata.get("question_type") or "-"):
            groups[key].append((s, truth == "yes", mass))
    result = {}
    for key, rows in sorted(groups.items(), key=lambda kv: (kv[0] != "ALL", kv[0])):
        s, positive, mass = (list(x) for x in zip(*rows, strict=True))
        result[key] = {
            "n": len(rows),
            "yes_share": sum(positive) / len(rows),
            "auc": roc_auc(s, positive),
            "best_threshold_acc": best_threshold_accuracy(s, positive),
            "acc_at_0": sum((x >= 0) == p for x, p in zip(s, positive, strict=True)) / len(rows),
            "mean_score": sum(s) / len(s),
            "yes_no_mass": sum(mass) / len(mass),
        }
    return result


def table(result: dict) -> str:
    headers = [
        "question type",
        "n",
        "AUC",
        "best-threshold acc",
        "greedy acc (s >= 0)",
        "mean log P(yes)/P(no)",
        "P(yes)+P(no)",
    ]
    rows = [
        [
            key,
            r["n"],
            "-" if r["auc"] is None else f"{r['auc']:.3f}",
            f"{100 * r['best_threshold_acc']:.1f}",
            f"{100 * r['acc_at_0']:.1f}",
            f"{r['mean_score']:+.2f}",
            f"{r['yes_no_mass']:.3f}",
        ]
        for key, r in result.items()
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    from medllava.generation import load

    parser = argparse.ArgumentParser(
        prog="python -m eval.diagnostics.yesno", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="default", help="'default' or a Llava directory")
    parser.add_argument("--data", type=Path, default=Path("data/medsynth/vqa_val.jsonl"))
    parser.add_argument("--suffix", default=ANSWER_SUFFIXES["CLOSED"], help="appended to each question")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of the file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--tell",
        default=None,
        help='a sentence put before each question, formatted with the row\'s fields, e.g. "This is a {modality} image."',
    )
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    questions = [
        q
        for q in load_questions(args.data, None, {"CLOSED": args.suffix}, limit=args.limit)
        if q.answer_type == "CLOSED"
    ]
    if not questions:
        raise SystemExit(f"{args.data}: no CLOSED questions")
    if args.tell:
        questions = tell(questions, args.data, args.tell)
    model_dir = resolve_model(args.model)
    model, processor = load(str(model_dir))
    result = {"model": str(model_dir), "data": str(args.data), "suffix": args.suffix, "tell": args.tell}
    result["by_type"] = summarise(questions, yes_no_scores(model, processor, questions, args.batch_size))
    print(table(result["by_type"]))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
