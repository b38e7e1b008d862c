"""Resumable runs (train.py --ckpt-every, --resume) on the tiny checkpoint.

On the CPU a run that is stopped and resumed ends with the same LoRA weights as an uninterrupted run,
bitwise (torch.equal), and the same results.json metrics and losses: a stop by --stop-after, SIGTERM or
Ctrl-C writes a checkpoint and exits non-zero with a hint, and a SIGKILL at a random step loses only the
steps since the last checkpoint. The runs use two tasks (the task index and the finished tasks' results
are in the checkpoint), LoRA dropout (torch's RNG) and replay / DER++ (the method's RNG, DER's logits).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loop
import train
from test_train import FIX

ROOT = Path(__file__).resolve().parent.parent
EVAL = ["--n-test", "2", "--max-new-tokens", "4", "--harmful", os.path.join(FIX, "advbench.csv"),
        "--sensitive", os.path.join(FIX, "prompts.txt")]
TRAIN = ["--epochs", "2", "--batch-size", "2", "--lora-dropout", "0.1", "--ckpt-every", "3",
         "--safety-data", os.path.join(FIX, "advbench.csv")]  # a memory of 3 refusals
RUN = ["--n-train", "8", "--task", "arithmetic,arithmetic", *TRAIN, *EVAL]  # 8 steps a task (9 with replay)
LONG = ["--n-train", "30", "--task", "arithmetic", *TRAIN, *EVAL]  # one task of 30 steps


def argv(tiny_checkpoint, out, *extra, method="sft", base=RUN):
    return ["--model", str(tiny_checkpoint), "--method", method, *base, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory):
    """uninterrupted(method, base) -> OUT of a run without a stop, run once per module."""
    runs = {}

    def get(method, base=RUN):
        key = (method, tuple(base))
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp(f"full-{method}")
            train.main(argv(tiny_checkpoint, runs[key], method=method, base=base))
        return runs[key]
    return get


def assert_same_run(a, b):
    wa, wb = (load_file(str(out / "adapter" / "adapter_model.safetensors")) for out in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (json.loads((out / "results.json").read_text()) for out in (a, b))
    assert [ra[k] for k in ("asr", "over_refusal", "task_accuracy")] == [rb[k] for k in ("asr", "over_refusal", "task_accuracy")]
    assert [(h["task"], h["losses"]) for h in ra["history"]] == [(h["task"], h["losses"]) for h in rb["history"]]


@pytest.mark.parametrize("method, stop_after, where", [
    ("derpp", 4, "step 4/8 of task 1/2"),
    ("replay", 9, "step 9/9 of task 1/2"),  # the first task's last step: the resumed run begins the second
    ("derpp", 13, "step 5/8 of task 2/2"),
])
def test_stopped_and_resumed_run_equals_uninterrupted(tiny_checkpoint, tmp_path, uninterrupted, method, stop_after, where):
    stop_and_resume(tiny_checkpoint, tmp_path / "run", uninterrupted, method, RUN, stop_after, where)


REFRESH = [*RUN, "--refresh-inner", "derpp", "--refresh-every", "2"]  # unlearns on even steps; DER++'s rng and logits
LISA = [*RUN, "--lisa-align-steps", "2", "--lisa-user-steps", "3"]  # align on steps 0-1 and 5-6, user on 2-4 and 7


@pytest.mark.parametrize("method, base, stop_after, where", [
    ("refresh", REFRESH, 5, "step 5/8 of task 1/2"),  # resumes on an odd step: no unlearning
    ("refresh", REFRESH, 13, "step 5/8 of task 2/2"),
    ("lisa", LISA, 6, "step 6/8 of task 1/2"),  # resumes inside an alignment stint: w_switch from step 5
    ("lisa", LISA, 11, "step 3/8 of task 2/2"),  # inside a user stint: w_switch from step 2
])
def test_methods_with_step_state_resume_mid_task(tiny_checkpoint, tmp_path, uninterrupted, method, base, stop_after, where):
    """Refresh's and Lisa's schedules follow the loop's step; Lisa keeps w_switch; DER++ inside Refresh its rng."""
    stop_and_resume(tiny_checkpoint, tmp_path / "run", uninterrupted, method, base, stop_after, where)


def stop_and_resume(tiny_checkpoint, out, uninterrupted, method, base, stop_after, where):
    """Stop a run by --stop-after at `where`, resume it, and compare it with the uninterrupted run."""
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny_checkpoint, out, "--stop-after", str(stop_after), method=method, base=base))
    assert str(e.value.code).startswith(f"stopped by --stop-after after {where}") and "--resume" in str(e.value.code)
    assert not (out / "results.json").exists()
    train.main(argv(tiny_checkpoint, out, "--resume", method=method, base=base))
    assert_same_run(uninterrupted(method, base), out)
    assert not (out / "ckpt").exists()  # a finished run keeps results.json, not its checkpoint


def test_same_seed_same_adapter(tiny_checkpoint, tmp_path, uninterrupted):
    """--seed fixes the data order, the sampling (replay, the memory batches) and the LoRA init."""
    train.main(argv(tiny_checkpoint, tmp_path / "again", method="derpp"))
    assert_same_run(uninterrupted("derpp"), tmp_path / "again")
    train.main(argv(tiny_checkpoint, tmp_path / "seed1", "--seed", "1", method="derpp"))
    a, b = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (uninterrupted("derpp"), tmp_path / "seed1"))
    assert not all(torch.equal(a[k], b[k]) for k in a)



def test_first_run_that_builds_the_aligned_model_equals_a_later_run(tiny_checkpoint, tmp_path, uninterrupted, monkeypatch):
    """Building the aligned model (first run only) draws from torch's and Python's generators; the user's
    LoRA init and data order must not depend on it, or a first run differs from every later one."""
    import align

    def build(device):
        torch.rand(10), random.random()  # as the alignment's LoRA init and shuffling do
        return tiny_checkpoint
    monkeypatch.setattr(align, "ensure_aligned", build)
    train.main(argv(tiny_checkpoint, tmp_path / "first", method="derpp")[2:])  # no --model: the default path
    assert_same_run(uninterrupted("derpp"), tmp_path / "first")


def subprocess_run(tiny_checkpoint, out):
    """`python train.py` of LONG in the background, with as many threads as this process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(out.parent / f"{out.name}.log", "w") as log:  # a file, not a pipe: tqdm's output never blocks it
        return subprocess.Popen([sys.executable, "train.py", *argv(tiny_checkpoint, out, base=LONG)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_step(proc, out, step, timeout=60):
    """Wait until OUT/ckpt holds a checkpoint at `step` or later; returns its step."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            done = json.loads((out / "ckpt" / "manifest.json").read_text())["step"]
            if done >= step:
                return done
        except FileNotFoundError:
            pass
        assert proc.poll() is None, (out.parent / f"{out.name}.log").read_text()[-2000:]
        time.sleep(0.002)
    raise TimeoutError


def test_sigkill_at_a_random_step_then_resume(tiny_checkpoint, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = subprocess_run(tiny_checkpoint, out)
    step, delay = random.randint(3, 21), random.uniform(0, 0.05)
    wait_for_step(proc, out, step)
    time.sleep(delay)  # anywhere in a step, a checkpoint's writing included
    assert proc.poll() is None, f"finished before the kill (step {step}, delay {delay:.3f})"
    proc.kill()
    proc.wait()
    assert not (out / "results.json").exists()
    train.main(argv(tiny_checkpoint, out, "--resume", base=LONG))
    assert_same_run(uninterrupted("sft", LONG), out)


def test_sigterm_writes_a_checkpoint_and_exits_with_a_hint(tiny_checkpoint, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = subprocess_run(tiny_checkpoint, out)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    hint = [line for line in (tmp_path / "run.log").read_text().splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert len(hint) == 1 and hint[0].endswith("run the same command with --resume to continue")
    step = int(hint[0].split("after step ")[1].split("/")[0])  # the step running when SIGTERM came
    assert json.loads((out / "ckpt" / "manifest.json").read_text())["step"] == step >= 3
    assert not (out / "results.json").exists()
    train.main(argv(tiny_checkpoint, out, "--resume", base=LONG))
    assert_same_run(uninterrupted("sft", LONG), out)


def test_ctrl_c_writes_a_checkpoint_at_the_end_of_the_step(tiny_checkpoint, tmp_path, monkeypatch, uninterrupted):
    lr_at = loop.lr_at

    def interrupt_at_step_5(step, *args):  # Ctrl-C arrives while step 5 runs
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, *args)
    monkeypatch.setattr(loop, "lr_at", interrupt_at_step_5)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny_checkpoint, out, base=LONG))
    assert str(e.value.code).startswith("stopped by SIGINT after step 6/30")
    assert json.loads((out / "ckpt" / "manifest.json").read_text())["step"] == 6
    monkeypatch.setattr(loop, "lr_at", lr_at)
    train.main(argv(tiny_checkpoint, out, "--resume", base=LONG))
    assert_same_run(uninterrupted("sft", LONG), out)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    lr_at = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda step, *args: float("nan") if step >= 7 else lr_at(step, *args))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny_checkpoint, out, base=LONG))
    msg = str(e.value.code)
    assert msg.startswith("error: non-finite loss") and "at step 9/30" in msg and "(step 6), is kept" in msg
    assert json.loads((out / "ckpt" / "manifest.json").read_text())["step"] == 6


def test_overwrite_then_stop_then_resume(tiny_checkpoint, tmp_path, uninterrupted):
    """--overwrite sets the finished run's results aside (results.previous.json) as training begins: a stopped rerun
    resumes instead of meeting old results, and the old ones go only when the new run has finished."""
    out = tmp_path / "run"
    train.main(argv(tiny_checkpoint, out, "--seed", "1"))
    old = (out / "results.json").read_text()
    with pytest.raises(SystemExit):
        train.main(argv(tiny_checkpoint, out, "--overwrite", "--stop-after", "4"))
    assert not (out / "results.json").exists() and (out / "ckpt" / "manifest.json").exists()
    assert (out / "results.previous.json").read_text() == old  # nothing lost while the new run is unfinished
    train.main(argv(tiny_checkpoint, out, "--resume"))
    assert_same_run(uninterrupted("sft"), out)
    assert not (out / "results.previous.json").exists()


def test_one_signal_delivered_twice_is_one_stop(tmp_path, monkeypatch):
    """A cluster signals every process of a job and the sweep passes its SIGTERM on too: two at once ask for one
    checkpoint; a second Ctrl-C seconds later stops at once."""
    import signal
    import checkpoint
    now = [100.0]
    monkeypatch.setattr(checkpoint.time, "time", lambda: now[0])
    ck = checkpoint.Checkpoints(tmp_path, 50)
    ck.on_signal(signal.SIGTERM, None)
    now[0] += 0.5
    ck.on_signal(signal.SIGTERM, None)  # the same stop, delivered twice
    assert ck.stop == ["SIGTERM"]
    now[0] += 3
    with pytest.raises(KeyboardInterrupt):
        ck.on_signal(signal.SIGINT, None)


def test_a_checkpoint_from_before_a_new_flag_resumes(tiny_checkpoint, tmp_path, uninterrupted):
    """A flag added after the run stopped: its checkpoint has no value for it, which means the default; resuming with
    the default goes on, with another value is refused."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train.main(argv(tiny_checkpoint, out, "--stop-after", "2"))
    manifest = out / "ckpt" / "manifest.json"
    meta = json.loads(manifest.read_text())
    del meta["config"]["eval_every"]  # as written by a train.py without --eval-every
    manifest.write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny_checkpoint, out, "--resume", "--eval-every", "5"))
    assert "--eval-every" in str(e.value.code)
    res = train.main(argv(tiny_checkpoint, out, "--resume"))
    want = json.loads((uninterrupted("sft") / "results.json").read_text())["history"][-1]["losses"]
    assert [list(x) for x in res["history"][-1]["losses"]] == want  # as if never stopped
