"""LLM judge for VQA answers through any OpenAI-compatible endpoint: a fixed rubric, cached on disk, resumable.

Usage:
    python -m eval.judge --url http://127.0.0.1:8000/v1 --predictions outputs/eval/predictions.jsonl \
        --cache outputs/judge_cache [--model NAME] [--all]

The judge reads the question, the reference answer and the model's answer and writes its verdict between
`[Begin Correctness]` and `[End Correctness]` markers, which are parsed the way VLMEvalKit parses its judge
(`vlmeval/dataset/image_shortqa.py`: "yes" xor "no" inside the markers; otherwise asked again at temperature 0.5
and 1.0, and scored wrong after three unparseable replies). The rubric is ours and fixed (RUBRIC_VERSION is part
of every request), so verdicts are reproducible against the same judge model. Each request is cached under
CACHE/<sha256 of the request>.json before the next one is sent: a rerun sends only what is missing. Judge
scores are reported beside the string metrics (eval.scoreboard), never instead of them. By default only OPEN
questions are judged; `--all` judges every question.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from eval.protocols import vlmevalkit_correctness

RUBRIC_VERSION = "medllava-judge-1"
SYSTEM_PROMPT = (
    "You grade answers to questions about medical images. You see the question, the reference answer and a "
    "model's answer, but not the image. Decide whether the model's answer means the same as the reference."
)
USER_TEMPLATE = """Rubric:
- Correct: the model's answer states the reference answer, in other words or with more detail that does not
  change or contradict it (synonyms, abbreviations, singular/plural and word order do not matter).
- Wrong: it contradicts the reference, gives a different finding, location, number or modality, hedges between
  several answers, leaves out part of a multi-part reference, or does not answer.
- For yes/no questions only the yes/no decision counts.

Reply in exactly this format:
[Begin Correctness]yes or no[End Correctness]
[Begin Reason]one short sentence[End Reason]

[Begin Question]{question}[End Question]
[Begin Reference]{answer}[End Reference]
[Begin Model Answer]{prediction}[End Model Answer]"""
TEMPERATURES = (0.0, 0.5, 1.0)  # VLMEvalKit retries with temperature 0.5 * attempt


class JudgeError(RuntimeError):
    """The endpoint could not be reached or refused a request; the message says which and why."""


@dataclass
class Verdict:
    hit: int  # 1 correct, 0 wrong (also when no reply could be parsed)
    reason: str
    attempts: int
    parsed: bool


def judge_messages(question: str, answer: str, prediction: str) -> list[dict]:
    user = USER_TEMPLATE.format(question=question, answer=answer, prediction=prediction)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def request_body(model: str, question: str, answer: str, prediction: str, temperature: float) -> dict:
    return {
        "model": model,
        "messages": judge_messages(question, answer, prediction),
        "temperature": temperature,
        "max_tokens": 128,
        "rubric": RUBRIC_VERSION,
    }


def request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _reason(text: str) -> str:
    start, end = "[Begin Reason]", "[End Reason]"
    return text.split(start)[1].split(end)[0].strip() if start in text and end in text else text.strip()[:200]


class Judge:
    """One judge model behind an OpenAI-compatible base URL, with a request-hash disk cache."""

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        model: str | None = None,
        api_key: str = "not-needed",
        timeout: float = 120.0,
    ):
        from openai import OpenAI

        self.url = url.rstrip("/")
        self.client = OpenAI(base_url=self.url, api_key=api_key, timeout=timeout, max_retries=2)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.model = model or self._first_model()
        self.sent = 0  # requests sent to the endpoint (cache misses)

    def _first_model(self) -> str:
        try:
            models = [m.id for m in self.client.models.list()]
        except Exception as e:  # noqa: BLE001 - openai raises several connection/HTTP error types
            raise JudgeError(f"--judge {self.url}: cannot list models ({type(e).__name__}: {e})") from None
        if not models:
            raise JudgeError(f"--judge {self.url}: the endpoint lists no models; pass --judge-model")
        return models[0]

    def complete(self, body: dict) -> str:
        """The judge's reply to one request, from the cache if it was asked before."""
        path = self.cache_dir / f"{request_hash(body)}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))["reply"]
            except (ValueError, KeyError):
                path.unlink()  # a torn cache file (killed during a write) is asked again
        params = {k: v for k, v in body.items() if k != "rubric"}
        try:
            response = self.client.chat.completions.create(**params)
        except Exception as e:  # noqa: BLE001 - openai raises several connection/HTTP error types
            raise JudgeError(f"--judge {self.url}: request failed ({type(e).__name__}: {e})") from None
        reply = response.choices[0].message.content or ""
        self.sent += 1
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"request": body, "reply": reply}, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        return reply

    def verdict(self, question: str, answer: str, prediction: str) -> Verdict:
        reply = ""
        for attempt, temperature in enumerate(TEMPERATURES, start=1):
            reply = self.complete(request_body(self.model, question, answer, prediction, temperature))
            hit = vlmevalkit_correctness(reply)
            if hit is not None:
                return Verdict(hit, _reason(reply), attempt, True)
        return Verdict(0, f"fail to judge: {reply.strip()[:120]}", len(TEMPERATURES), False)

    def judge_rows(self, rows: list[dict], desc: str = "judging") -> dict[str, Verdict]:
        """{id: Verdict} for prediction rows (id, question, answer, prediction)."""
        out = {}
        for row in tqdm(rows, desc=desc, unit="q", disable=len(rows) < 50):
            out[row["id"]] = self.verdict(
                str(row.get("question", "")), str(row["answer"]), str(row.get("prediction") or "")
            )
        return out


def summary(verdicts: dict[str, Verdict]) -> dict:
    n = len(verdicts)
    return {
        "n": n,
        "accuracy": sum(v.hit for v in verdicts.values()) / n if n else None,
        "unparsed": sum(not v.parsed for v in verdicts.values()),
    }


def main(argv: list[str] | None = None) -> None:
    from medllava.schema import SchemaError, read_jsonl

    p = argparse.ArgumentParser(prog="python -m eval.judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument(
        "--predictions", required=True, nargs="+", help="prediction JSONL file(s) of eval.generate"
    )
    p.add_argument("--cache", required=True, help="directory of cached judge replies (resumable)")
    p.add_argument("--model", help="judge model name (default: the endpoint's first listed model)")
    p.add_argument("--api-key", default="not-needed")
    p.add_argument("--all", action="store_true", help="judge every question, not only OPEN ones")
    p.add_argument("--output", help="write {id: verdict} JSON here")
    args = p.parse_args(argv)
    try:
        rows = [row for path in args.predictions for _, row in read_jsonl(path)]
        if not args.all:
            rows = [r for r in rows if r.get("answer_type") == "OPEN"]
        judge = Judge(args.url, Path(args.cache), args.model, args.api_key)
        verdicts = judge.judge_rows(rows)
    except (JudgeError, SchemaError) as e:
        sys.exit(f"eval.judge: error: {e}")
    if args.output:
        Path(args.output).write_text(
            json.dumps({k: v.__dict__ for k, v in verdicts.items()}, indent=1) + "\n"
        )
    print(json.dumps({**summary(verdicts), "judge_model": judge.model, "requests_sent": judge.sent}))


if __name__ == "__main__":
    main()
