"""Distributed training on CPU through the Makefile's launch path (`make train-stage2 ...` -> accelerate launch).

Slow (each launch starts 2+ Python processes; DeepSpeed compiles its CPU communication op on first use):
    .venv/bin/python -m pytest tests/test_train_distributed.py -q -m slow
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from test_train import data  # noqa: F401 - the tiny model + JSONL fixture

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def recipe(data, tmp_path) -> Path:  # noqa: F811
    path = tmp_path / "tiny_stage2.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(data["model"]),
                "stage": "instruct",
                "train_file": str(data["sft"]),
                "output_dir": str(tmp_path / "unused"),
                "max_steps": 2,
                "per_device_train_batch_size": 2,
                "learning_rate": 1e-3,
                "lr_scheduler_type": "constant",
                "max_length": 256,
                "bf16": False,
                "gradient_checkpointing": False,
                "logging_steps": 1,
                "save_steps": 2,
                "report_to": "none",
                "seed": 0,
                "disable_tqdm": True,
            }
        )
    )
    return path


def make_train(
    tmp_path,
    config: str,
    out: Path,
    recipe_path: Path,
    nproc: int = 2,
    launch_args: str = "",
    background: bool = False,
    log_name: str | None = None,
):
    cmd = [
        "make",
        "--no-print-directory",
        "train-stage2",
        f"RECIPE={recipe_path}",
        f"OUTPUT_DIR={out}",
        f"ACCELERATE_CONFIG=train/accelerate/{config}",
        f"NUM_PROCESSES={nproc}",
        f"LAUNCH_ARGS={launch_args}",
    ]
    # closed with the process by the caller
    log = open(tmp_path / f"{log_name or out.name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    if background:
        return proc
    proc.wait(timeout=1500)
    return proc


def report(out: Path) -> dict:
    return json.loads((out / "train_report.json").read_text())


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in report(out)["log_history"] if "loss" in e]


def reloads(out: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    # ZeRO-3 must have gathered full tensors
    assert all(p.numel() > 0 for p in model.parameters())


def _check(tmp_path, proc, out, world_size, zero_stage):
    log = (tmp_path / f"{out.name}.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    r = report(out)
    assert r["world_size"] == world_size and r["zero_stage"] == zero_stage, r
    assert len(losses(out)) == 2
    reloads(out)


def test_ddp_zero2_zero3_two_processes_agree(data, tmp_path):  # noqa: F811
    path = recipe(data, tmp_path)
    runs = {}
    for config, stage in (("ddp.yaml", None), ("zero2.yaml", 2), ("zero3.yaml", 3)):
        out = tmp_path / config.removesuffix(".yaml")
        proc = make_train(tmp_path, config, out, path)
        _check(tmp_path, proc, out, 2, stage)
        runs[config] = losses(out)
    # same data, same global batch: DDP (gloo) and DeepSpeed ZeRO-2/3 give the same losses
    assert runs["zero2.yaml"] == pytest.approx(runs["ddp.yaml"], rel=1e-4)
    assert runs["zero3.yaml"] == pytest.approx(runs["ddp.yaml"], rel=1e-4)


def test_two_nodes_on_loopback(data, tmp_path):  # noqa: F811
    """Two launches with machine_rank 0 and 1 (one process each) rendezvous on 127.0.0.1: one 2-process job."""
    path, out, port = recipe(data, tmp_path), tmp_path / "two_nodes", free_port()
    procs = [
        make_train(
            tmp_path,
            "multinode_zero3.yaml",
            out,
            path,
            background=True,
            log_name="two_nodes" if rank == 0 else "two_nodes_rank1",
            launch_args=f"--machine_rank {rank} --main_process_ip 127.0.0.1 --main_process_port {port}",
        )
        for rank in (0, 1)
    ]
    for proc in procs:
        proc.wait(timeout=1500)
    assert procs[1].returncode == 0, (tmp_path / "two_nodes_rank1.log").read_text()[-4000:]
    _check(tmp_path, procs[0], out, 2, 3)


SRUN_STUB = """#!/bin/bash
# Stand-in for srun on one machine: run the task once per "node", each with its own SLURM_NODEID.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node "$@" > "$STUB_LOG_DIR/node$node.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""


def test_slurm_script_runs_two_nodes_on_loopback(data, tmp_path):  # noqa: F811
    """train/slurm/train_stage2.sbatch with stand-ins for srun/scontrol: 2 "nodes" x 1 process, ZeRO-3."""
    path = recipe(data, tmp_path)
    out = tmp_path / "slurm_out"
    spec = yaml.safe_load(path.read_text()) | {"output_dir": str(out)}
    path.write_text(yaml.safe_dump(spec))
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(SRUN_STUB)
    (stubs / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = os.environ | {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
        "GPUS_PER_NODE": "1",
        "RECIPE": str(path),
        "MASTER_PORT": str(free_port()),
        "STUB_LOG_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", "train/slurm/train_stage2.sbatch"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    logs = "".join((tmp_path / f"node{i}.log").read_text()[-3000:] for i in (0, 1))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "--machine_rank 1" in (tmp_path / "node1.log").read_text()
    r = report(out)
    assert r["world_size"] == 2 and r["zero_stage"] == 3, r
    reloads(out)
