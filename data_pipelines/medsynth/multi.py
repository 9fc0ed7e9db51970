"""medsynth's multi-image families, built apart from the default set (`make data` does not write them):
longitudinal pairs (a prior and a current study of one background; `longitudinal.py`) and volume rows (neighbouring
slices of a real MRI volume with a synthetic ellipsoid lesion; `volume_rows.py`).

Usage:
    python -m data_pipelines.medsynth.multi --out data/medsynth_multi --seed 0          # `make data-multi`
    python -m data_pipelines.medsynth.multi --out /tmp/msm --seed 1 --size 0.05         # a small build

Output, per split (train/val/test; the backgrounds of a split are those the default build gives that split,
so no background unit is in two splits here or across the two builds; the default build's `unseen` files are
not used): DIR/longitudinal_<split>.jsonl and DIR/volume_<split>.jsonl (VQA rows in the project schema, CLOSED
answers stated, OPEN ones short, `short_answer`, `question_type`, `instance` and `unit` on every row),
DIR/instances_longitudinal_<split>.jsonl and DIR/instances_volume_<split>.jsonl (the ground truth of each pair or
volume instance), PNGs under DIR/images/ (long-*.png, vol-*.png) and DIR/multi_build.json (arguments, counts,
notes). Every background file comes from a PyPI package (checked: never a Debian or npm package's file). The same
seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from data_pipelines.common import format_table, progress
from data_pipelines.medsynth.backgrounds import SOURCE_BY_KEY, catalogue, load_background
from data_pipelines.medsynth.builder import base_parser
from data_pipelines.medsynth.longitudinal import pair_rows, render_pair_job, sample_pairs, select_questions
from data_pipelines.medsynth.vocab import IN_DOMAIN
from data_pipelines.medsynth.volume_rows import (
    load_base,
    render_volume_job,
    sample_volume_specs,
    select_volume_questions,
    volume_rows,
    volume_slabs,
)
from medllava.schema import write_jsonl

FAMILIES = ("longitudinal", "volume")
DEFAULT_INSTANCES = {
    "longitudinal": {"train": 800, "val": 80, "test": 160},
    "volume": {"train": 400, "val": 60, "test": 100},
}
DEFAULT_ROWS = {
    "longitudinal": {"train": 2000, "val": 200, "test": 400},
    "volume": {"train": 800, "val": 120, "test": 200},
}
# Where Debian and npm put package files: a background must never come from there.
FOREIGN_PARTS = ("dist-packages", "node_modules")


def scaled(value: int, size: float, minimum: int) -> int:
    return max(minimum, round(value * size))


def check_pypi_file(path: Path) -> None:
    """Refuse a background file that is not inside a Python environment's site-packages (where pip puts PyPI
    packages), or that lies under a Debian (dist-packages, /usr/share) or npm (node_modules) folder."""
    parts = Path(path).resolve().parts
    if (
        any(p in FOREIGN_PARTS for p in parts)
        or parts[:3] == ("/", "usr", "share")
        or "site-packages" not in parts
    ):
        raise ValueError(
            f"{path}: not a file of a PyPI package in site-packages; medsynth never uses Debian or npm files"
        )


def our_files(out: Path) -> list[Path]:
    names = [f"{prefix}_{split}.jsonl" for prefix in FAMILIES for split in IN_DOMAIN]
    names += [f"instances_{family}_{split}.jsonl" for family in FAMILIES for split in IN_DOMAIN]
    files = [out / name for name in [*names, "multi_build.json"]]
    images = out / "images"
    if images.is_dir():
        files += sorted(images.glob("long-*.png")) + sorted(images.glob("vol-*.png"))
    return files


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier build unless --overwrite; then remove only what this tool writes."""
    existing = [p for p in our_files(out) if p.exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"error: {out} already holds a medsynth multi-image build ({existing[0].name}); pass --overwrite"
        )
    for p in existing:
        p.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)


def build(args) -> dict:
    """Both families into args.out. Returns {family: {split: rows}}."""
    t0 = time.perf_counter()
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    units, files, notes = catalogue()
    notes = [n for n in notes if "not installed" in n]
    units = [u for u in units if u.split in IN_DOMAIN]
    labels = {key: f"{SOURCE_BY_KEY[key].package}/{SOURCE_BY_KEY[key].relpath}" for key in files}
    n = {
        family: {split: scaled(DEFAULT_INSTANCES[family][split], args.size, 8) for split in IN_DOMAIN}
        for family in FAMILIES
    }
    n_rows = {
        family: {split: scaled(DEFAULT_ROWS[family][split], args.size, 4) for split in IN_DOMAIN}
        for family in FAMILIES
    }

    pair_specs = [
        spec
        for split in IN_DOMAIN
        for spec in sample_pairs(units, split, n["longitudinal"][split], args.seed)
    ]
    used = {spec.unit for spec in pair_specs}
    library = {}
    for unit in progress([u for u in units if u.key in used], "loading backgrounds", unit="img"):
        check_pypi_file(files[unit.source])
        library[unit.key] = load_background((unit, str(files[unit.source])))
    pairs = [
        render_pair_job(spec, library[spec.unit], out, args.image_size, labels[spec.source])
        for spec in progress(pair_specs, "rendering pairs", unit="pair")
    ]

    slabs, slab_notes = volume_slabs(units)
    notes += slab_notes
    by_key = {slab.key: slab for slab in slabs}
    volume_specs = [
        spec
        for split in IN_DOMAIN
        for spec in sample_volume_specs(slabs, split, n["volume"][split], args.seed)
    ]
    bases = {}
    for source in sorted({spec.source for spec in volume_specs}):
        check_pypi_file(files[source])
        bases[source] = load_base(files[source], labels[source])
    volumes = [
        render_volume_job(spec, by_key[spec.unit], bases[spec.source], out)
        for spec in progress(volume_specs, "rendering volumes", unit="vol")
    ]

    instances = {"longitudinal": pairs, "volume": volumes}
    select = {"longitudinal": select_questions, "volume": select_volume_questions}
    make_rows = {"longitudinal": pair_rows, "volume": volume_rows}
    rows = {family: {} for family in FAMILIES}
    for family in FAMILIES:
        for split in IN_DOMAIN:
            insts = [i for i in instances[family] if i["split"] == split]
            rnd = random.Random(f"{args.seed}/{split}/{family}")
            picked = select[family](insts, n_rows[family][split], rnd)
            rows[family][split] = make_rows[family](picked, split)
            write_jsonl(out / f"instances_{family}_{split}.jsonl", insts)
            write_jsonl(out / f"{family}_{split}.jsonl", rows[family][split])
            if len(rows[family][split]) < n_rows[family][split]:
                notes.append(
                    f"{family}_{split}: {len(rows[family][split])} rows, {n_rows[family][split]} requested"
                )
    summary = dict(
        args=dict(seed=args.seed, size=args.size, image_size=args.image_size),
        counts={
            family: {
                split: dict(
                    instances=sum(i["split"] == split for i in instances[family]),
                    rows=len(rows[family][split]),
                    question_types=dict(
                        sorted(Counter(r["question_type"] for r in rows[family][split]).items())
                    ),
                )
                for split in IN_DOMAIN
            }
            for family in FAMILIES
        },
        notes=notes,
    )
    (out / "multi_build.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for note in notes:
        print(f"note: {note}")
    print(counts_table(summary["counts"]))
    print(f"wrote {out} ({len(pairs)} pairs, {len(volumes)} volumes) in {time.perf_counter() - t0:.1f} s")
    return rows


def counts_table(counts: dict) -> str:
    table = [
        [
            family,
            split,
            c["instances"],
            c["rows"],
            ", ".join(f"{k} {v}" for k, v in c["question_types"].items()),
        ]
        for family, by_split in counts.items()
        for split, c in by_split.items()
    ]
    return format_table(["family", "split", "instances", "rows", "rows per question type"], table)


def parse_args(argv=None):
    parser = base_parser(
        "python -m data_pipelines.medsynth.multi",
        __doc__,
        "1,040 pairs and 560 volumes; at least 8 of each per split",
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="side of the pairs' square PNGs (default 224)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    args = parser.parse_args(argv)
    if args.size <= 0:
        parser.error("--size must be > 0")
    if args.image_size < 112:
        parser.error("--image-size must be at least 112 (findings are sized for a 112 px model input)")
    return args


def main(argv=None) -> int:
    build(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
