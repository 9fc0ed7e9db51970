"""The build: catalogue, backgrounds, rendered images, rows of every stage, README; and its command line
(`python -m data_pipelines.medsynth`, see the package docstring)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from data_pipelines.common import progress
from data_pipelines.medsynth.backgrounds import SOURCE_BY_KEY, catalogue, load_background
from data_pipelines.medsynth.findings import _init_worker, _render_job, sample_specs
from data_pipelines.medsynth.questions import select_grpo, select_vqa, vqa_table
from data_pipelines.medsynth.readme_text import readme, rows_table
from data_pipelines.medsynth.rows import caption_rows, grpo_rows, instruct_rows, vqa_rows
from data_pipelines.medsynth.vocab import CLOSED_ANSWERS, SPLITS, STAGES
from medllava.schema import write_jsonl

# Default sizes, fitted to a ~60-minute CPU curriculum at 112 px (~1.5-2k samples per stage).
# Test: 40 images per modality and enough VQA rows (with more modality questions, see the test shares in
# questions.VQA_QUESTIONS) for >= 20 modality questions per modality. Unseen: 40 images per modality that has
# a held-out file (CT, MRI, ultrasound, histology), the same question mix as test.
DEFAULT_INSTANCES = {"train": 1500, "val": 160, "test": 280, "unseen": 160}
DEFAULT_ROWS = {
    "captions": {"train": 1500, "val": 100, "test": 150, "unseen": 160},
    "instruct": {"train": 1000, "val": 100, "test": 150, "unseen": 100},
    # train: ~8 questions per image, merged into conversations by data_pipelines.group_turns for stage 3
    "vqa": {"train": 12000, "val": 300, "test": 600, "unseen": 400},
    "grpo": {"train": 600, "val": 100, "test": 200, "unseen": 100},
}


def scaled(value: int, size: float, minimum: int) -> int:
    return max(minimum, round(value * size))


def n_images(split: str, args) -> int:
    """Images of a split: the default count times --size, or --train-images for train."""
    if split == "train" and args.train_images is not None:
        return args.train_images
    return scaled(DEFAULT_INSTANCES[split], args.size, 8)


def n_rows(stage: str, split: str, args) -> int:
    """Rows of a file: the default count times --size; with --train-images, train files keep the default number
    of rows per image (e.g. ~8 VQA questions per image)."""
    if split == "train" and args.train_images is not None:
        return max(4, round(DEFAULT_ROWS[stage]["train"] * args.train_images / DEFAULT_INSTANCES["train"]))
    return scaled(DEFAULT_ROWS[stage][split], args.size, 4)


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier build unless --overwrite; then remove only what this tool writes."""
    ours = [
        out / "images",
        out / "README.md",
        *(out / f"{s}_{p}.jsonl" for s in (*STAGES, "instances") for p in SPLITS),
    ]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"error: {out} already holds a medsynth build ({existing[0].name}); pass --overwrite"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)


def _pool_map(fn: Callable, jobs: list, workers: int, desc: str, initargs=None) -> list:
    """Ordered map with a progress bar; in-process when workers <= 1."""
    if workers <= 1:
        if initargs is not None:
            _init_worker(*initargs)
        return [fn(job) for job in progress(jobs, desc, total=len(jobs), unit="img")]
    methods = mp.get_all_start_methods()
    context = mp.get_context("fork" if "fork" in methods else None)
    kwargs = dict(initializer=_init_worker, initargs=initargs) if initargs is not None else {}
    with context.Pool(workers, **kwargs) as pool:
        return list(progress(pool.imap(fn, jobs, chunksize=4), desc, total=len(jobs), unit="img"))


def build(args) -> dict:
    """Everything: catalogue, backgrounds, images, rows, README. Returns the rows per stage and split."""
    t0 = time.perf_counter()
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    units, files, notes = catalogue()
    for note in notes:
        print(f"note: {note}")
    specs = [
        spec for split in SPLITS for spec in sample_specs(units, split, n_images(split, args), args.seed)
    ]
    # a small build loads only what it uses
    used = [u for u in units if u.key in {spec.unit for spec in specs}]
    jobs = [(u, str(files[u.source])) for u in used]
    arrays = _pool_map(load_background, jobs, args.num_workers, "loading backgrounds")
    library = {u.key: a for u, a in zip(used, arrays, strict=True)}
    print(
        f"{len(used)} of {len(units)} background units loaded from {len(files)} files "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    labels = {key: f"{SOURCE_BY_KEY[key].package}/{SOURCE_BY_KEY[key].relpath}" for key in files}
    render_jobs = [(spec, str(out), args.image_size, labels[spec.source]) for spec in specs]
    rendered = _pool_map(_render_job, render_jobs, args.num_workers, "rendering images", initargs=(library,))
    instances = {split: [r for r in rendered if r["split"] == split] for split in SPLITS}

    rows = {stage: {} for stage in STAGES}
    for split in SPLITS:
        insts = instances[split]
        n = {stage: n_rows(stage, split, args) for stage in STAGES}
        rnd = lambda stage, s=split: random.Random(f"{args.seed}/{s}/{stage}")  # noqa: E731 - one stream per file
        rows["captions"][split] = caption_rows(insts, n["captions"], split, rnd("captions"))
        rows["instruct"][split] = instruct_rows(insts, n["instruct"], split, rnd("instruct"))
        picked = select_vqa(insts, n["vqa"], rnd("vqa"), vqa_table(split))
        rows["vqa"][split] = vqa_rows(picked, split, args.closed_answers)
        rows["grpo"][split] = grpo_rows(select_grpo(insts, n["grpo"], rnd("grpo")), split)
        write_jsonl(out / f"instances_{split}.jsonl", insts)
        for stage in STAGES:
            write_jsonl(out / f"{stage}_{split}.jsonl", rows[stage][split])
            if len(rows[stage][split]) < n[stage]:  # too few images with lesions for the question mix
                note = f"{stage}_{split}: {len(rows[stage][split])} rows, {n[stage]} requested"
                notes.append(note)
                print(f"note: {note}")
    text = readme(args, rows, instances, units, notes)
    (out / "README.md").write_text(text, encoding="utf-8")
    print(rows_table(rows, instances))
    print(
        f"wrote {out} ({sum(len(v) for v in instances.values())} images) in {time.perf_counter() - t0:.1f} s"
    )
    return rows


def base_parser(prog: str, description: str, counts: str) -> argparse.ArgumentParser:
    """The arguments every medsynth build starts with: --out, --seed and --size (`counts`: what 1.0 gives)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    parser.add_argument(
        "--size", type=float, default=1.0, help=f"multiplier on the default counts (1.0: {counts})"
    )
    return parser


def parse_args(argv=None):
    parser = base_parser(
        "python -m data_pipelines.medsynth",
        sys.modules[__package__].__doc__,
        "~1,940 images, 12,000 train VQA rows",
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="train images (default 1,500 x --size); the train files keep their rows per image",
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="side of the saved square PNGs (default 224)"
    )
    parser.add_argument(
        "--closed-answers",
        choices=CLOSED_ANSWERS,
        default="stated",
        help="CLOSED VQA answers: 'stated' (the finding asked about, then the verdict: 'This is an MRI image. "
        "No.'; default) or 'verdict' (bare 'yes'/'no'); GRPO solutions are always the bare verdict",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="processes for loading and rendering")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    args = parser.parse_args(argv)
    if args.size <= 0:
        parser.error("--size must be > 0")
    if args.train_images is not None and args.train_images < 8:
        parser.error("--train-images must be at least 8")
    if args.image_size < 112:
        parser.error("--image-size must be at least 112 (findings are sized for a 112 px model input)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    build(args)
    return 0
