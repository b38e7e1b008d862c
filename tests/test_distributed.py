"""torchrun with two CPU processes (gloo) trains the same model as one process: same losses, same adapter."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from test_train import FAST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
i = FAST.index("--batch-size")
COMMON = [*FAST[:i], *FAST[i + 2:], "--n-train", "16", "--epochs", "3", "--lr", "3e-3", "--device", "cpu",
          "--dtype", "fp32"]  # batch size below; fp32: the processes' sums agree to 1e-4, bf16's rounding would not


def train(argv, nproc=1):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    r = subprocess.run([*launch, "train.py", *argv], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("method", ["der"])  # a user loss and a memory term (drawn alike in every process)
def test_two_processes_match_one(tiny_checkpoint, tmp_path, method):
    common = ["--model", str(tiny_checkpoint), "--method", method, *COMMON]
    train([*common, "--batch-size", "4", "--out", str(tmp_path / "one")])
    train([*common, "--batch-size", "2", "--out", str(tmp_path / "two")], nproc=2)  # 2 x 2 = the same step
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    l1, l2 = one["history"][0]["losses"], two["history"][0]["losses"]
    assert [s for s, *_ in l1] == [s for s, *_ in l2] and len(l1) >= 2
    assert l1[-1][1] < l1[0][1] - 1e-3  # it learned something, so the comparison means something
    for (_, a, *_), (_, b, *_) in zip(l1, l2):
        assert b == pytest.approx(a, rel=1e-4)
    w1, w2 = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() < 1e-4, k
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "answers.jsonl", "results.json"]  # rank 0 wrote, once


@pytest.mark.parametrize("method", ["sft", "der"])
def test_fsdp_matches_one_process(tiny_checkpoint, tmp_path, method):
    """FSDP2 (fully_shard per block) over two gloo processes: the same losses and adapter as one process."""
    common = ["--model", str(tiny_checkpoint), "--method", method, *COMMON, "--ckpt-every", "0"]
    train([*common, "--batch-size", "4", "--out", str(tmp_path / "one")])
    train([*common, "--batch-size", "2", "--fsdp", "--out", str(tmp_path / "two")], nproc=2)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    for (s1, a, *_), (s2, b, *_) in zip(one["history"][0]["losses"], two["history"][0]["losses"]):
        assert s1 == s2 and b == pytest.approx(a, rel=1e-4)
    assert two["asr"] == one["asr"] and two["task_accuracy"] == one["task_accuracy"]  # every process evaluated alike
    w1, w2 = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() < 1e-4, k
