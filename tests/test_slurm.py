"""sweep.py --slurm against a real single-node Slurm (slurmctld, slurmd and munge on localhost, started by
.ci/slurm-local): a small sweep submitted as a job array gives the table of the same sweep run locally, and an array
task requeued mid-run (as pre-emption does) resumes from its checkpoint to the run's uninterrupted end."""
import csv
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import sweep
from test_sweep import FAST
from test_train import moving  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def slurm():
    if not shutil.which("sbatch"):
        pytest.skip("Slurm is not installed (CI installs it: apt-get install slurmctld slurmd munge slurm-client)")
    up = lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
    if not any(s in up() for s in ("idle", "mixed", "alloc")):
        if os.geteuid() != 0:
            pytest.skip("Slurm is installed but not running, and starting it takes root (.ci/slurm-local)")
        subprocess.run(["bash", str(ROOT / ".ci" / "slurm-local")], check=True)


def table(results):
    with open(results / "summary.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "total_seconds", "out")} for r in csv.DictReader(f)]


def test_a_sweep_on_slurm_gives_the_local_table(slurm, tiny_checkpoint, tmp_path):
    flags = ["--methods", "sft,replay", "--scenarios", "poisoned", "--seeds", "0,1", "--model", str(tiny_checkpoint), *FAST]
    sweep.main([*flags, "--results", str(tmp_path / "local")])
    sweep.main([*flags, "--results", str(tmp_path / "slurm"), "--slurm", "--wait"])
    assert table(tmp_path / "slurm") == table(tmp_path / "local") and len(table(tmp_path / "local")) == 4
    logs = list((tmp_path / "slurm" / "slurm").glob("*_*.log"))
    assert len(logs) == 4 and all("done in" in log.read_text() for log in logs)  # one array task a run


def test_a_requeued_array_task_resumes(slurm, moving, tmp_path, capsys):  # noqa: F811
    flags = ["--methods", "sft", "--scenarios", "poisoned", "--seeds", "0", *moving, "--ckpt-every", "5"]
    sweep.main([*flags, "--results", str(tmp_path / "local")])
    sweep.main([*flags, "--results", str(tmp_path / "slurm"), "--slurm"])
    job = capsys.readouterr().out.split("Slurm job(s) ")[1].split(";")[0]
    run = tmp_path / "slurm" / "runs" / "sft-poisoned-s0"
    for _ in range(600):  # a checkpoint exists: the run is mid-way
        if (run / "ckpt" / "manifest.json").exists():
            break
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True)  # what pre-emption with --requeue does
    for _ in range(120):  # Slurm holds a requeued job back for two minutes: let it start at once
        if "PENDING" in subprocess.run(["squeue", "-h", "-o", "%T", "-j", job], capture_output=True, text=True).stdout:
            subprocess.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"], capture_output=True)
            break
        time.sleep(0.5)
    sweep.wait_for([job], every=1)
    log = (run / "train.log").read_text()
    assert "--resume" in log and "stopped by SIGTERM" in log  # stopped with a checkpoint, then resumed from it
    local = json.loads((tmp_path / "local" / "runs" / "sft-poisoned-s0" / "results.json").read_text())
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["history"][0]["losses"] == local["history"][0]["losses"]  # as if never stopped
    assert {k: resumed[k] for k in ("asr", "over_refusal", "task_accuracy")} == {k: local[k] for k in ("asr", "over_refusal", "task_accuracy")}
