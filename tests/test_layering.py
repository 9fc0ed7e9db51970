"""The layout is the architecture: stage folders import only the core (`medllava`), never each other.

Parses every module's imports with `ast` (no module is imported), so a new cross-stage import fails here whatever
the code path that would reach it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data_pipelines", "train", "eval", "serve", "bench")
CORE = "medllava"


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file, at any depth (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


def violations(root: Path = REPO) -> list[str]:
    out = []
    for folder in (*STAGES, CORE):
        for path in sorted((root / folder).rglob("*.py")):
            for line, package in sorted(imported_packages(path)):
                other_stage = package in STAGES and package != folder
                if other_stage or (folder == CORE and package in STAGES):
                    out.append(f"{path.relative_to(root)}:{line} imports {package}")
    return out


def test_stages_import_only_the_core():
    assert violations() == []


def test_the_check_catches_a_cross_stage_import(tmp_path):
    for folder in (*STAGES, CORE):
        (tmp_path / folder).mkdir()
    (tmp_path / "bench" / "x.py").write_text("def f():\n    from serve.__main__ import resolve_model\n")
    (tmp_path / "medllava" / "y.py").write_text("import eval.generate\n")
    (tmp_path / "train" / "z.py").write_text(
        "from medllava.prompts import with_suffix\nfrom train import configs\n"
    )
    assert violations(tmp_path) == ["bench/x.py:2 imports serve", "medllava/y.py:1 imports eval"]


@pytest.mark.parametrize("folder", STAGES)
def test_stage_folders_exist(folder):
    assert any((REPO / folder).rglob("*.py")), f"{folder}/ has no modules: update STAGES"


def test_installing_puts_no_generic_top_level_names_in_site_packages(tmp_path):
    """Only `medllava` and `data_pipelines` are packaged; `train`, `eval`, `serve` and `bench` would collide with
    other projects' modules of those names, so they run from the checkout."""
    import os
    import subprocess
    import sys
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["medllava*", "data_pipelines*"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    names = ["medllava", "data_pipelines", *STAGES[1:]]
    code = f"import importlib.util as u; print([m for m in {names!r} if u.find_spec(m)])"
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert found.stdout.strip() == "['medllava', 'data_pipelines']", found.stderr


def test_readme_layout_matches_the_tree():
    """Every folder the README's layout names exists, and every module of the code folders is named there."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    described: dict[str, str] = {}
    folder = None
    for line in block.splitlines():
        if line[:1].strip():
            folder, _, text = line.partition(" ")
            folder = folder.rstrip("/")
            described[folder] = text
        elif folder:
            described[folder] += " " + line.strip()
    assert set(described) >= {CORE, *STAGES, "tests", "docs"}
    for name in described:
        assert (REPO / name).is_dir(), f"README layout names {name}/, which does not exist"
    for name in (CORE, *STAGES):
        text = described[name]
        modules = [p.stem for p in (REPO / name).glob("*.py")] + [
            p.parent.name for p in (REPO / name).glob("*/__init__.py")
        ]
        for module in sorted(modules):
            if module in ("__init__", "__main__"):
                continue
            assert module in text, f"README layout: {name}/{module} is not named on the {name}/ line"
