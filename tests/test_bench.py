"""bench.py runs both sides on the same weights and batches: the logits and the greedy tokens agree; the experiment
workload is the default run's own batches and prompts; the end-to-end run and the GPU suite run through (CPU, tiny)."""
import os

import pytest
import torch

import bench
from batches import n_targets
from tokenizer import Tokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "formats")


def test_bench_compares_like_with_like(tiny_checkpoint, tmp_path):
    res = bench.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "fp32", "--workload", "random",
                      "--steps", "1", "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--gen-batch", "3",
                      "--prompt-len", "5", "--new-tokens", "6", "--json", str(tmp_path / "b.json")])
    assert res["max_abs_logit_gap"] < 1e-4
    assert res["generate_same_tokens"] == 1.0  # fp32, greedy: the same continuation token for token
    for side in ("train_ours", "train_hf", "generate_ours", "generate_hf"):
        assert res[side]["tokens_per_s"] > 0
    assert (tmp_path / "b.json").exists()


def test_rounds_alternate_the_sides_and_report_the_median_ratio(tiny_checkpoint):
    res = bench.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "fp32", "--workload", "random",
                      "--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "8", "--gen-batch", "2",
                      "--prompt-len", "3", "--new-tokens", "2", "--rounds", "3"])
    for what, key in (("train", "tokens_per_s"), ("generate", "seconds")):
        ours, hf = res[f"{what}_ours"], res[f"{what}_hf"]
        assert len(ours["rounds"]) == len(hf["rounds"]) == 3
        per_round = [o[key] / h[key] if key == "tokens_per_s" else h[key] / o[key] for o, h in zip(ours["rounds"], hf["rounds"])]
        assert ours["ratio"] == sorted(per_round)[1]
        assert ours[key] == sorted(r[key] for r in ours["rounds"])[1]
    with pytest.raises(SystemExit):
        bench.get_args(["--rounds", "0"])


def test_the_experiment_workload_is_the_default_runs_work(tiny_checkpoint):
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    batches = bench.experiment_batches(tok, 3, 8)
    first = bench.experiment_examples(tok)
    assert len(batches) == 3 and all(b["idx"].shape[0] == 8 for b in batches)
    for b in batches:  # response-only targets, right padding, each row's true length for HF's attention mask
        assert 0 < len(b["tgt"]) < (b["labels"] != -100).numel()
        assert (b["lengths"] <= b["idx"].shape[1]).all() and b["lengths"].max() == b["idx"].shape[1]
        assert (b["labels"][torch.arange(b["idx"].shape[1])[None] >= b["lengths"][:, None]] == -100).all()
    assert sum(len(b["tgt"]) for b in batches) <= 3 * 8 * max(map(n_targets, first))
    prompts = bench.eval_prompts(tok, 64)
    assert sorted({n for _, n in prompts}) == [32, 40] and 60 <= len(prompts) <= 68
    gen = bench.generation_batches(prompts, 16)
    assert sum(len(ids) for ids, _ in gen) == len(prompts)
    for ids, _ in gen:
        assert [len(r) for r in ids] == sorted((len(r) for r in ids), reverse=True)  # longest first, as generate.complete


def test_experiment_workload_agrees_with_hf(tiny_aligned):
    """The aligned tiny model stops (it refuses or says "Sure."): the stop tokens are exercised on both sides."""
    res = bench.main(["--model", str(tiny_aligned), "--device", "cpu", "--dtype", "fp32", "--steps", "1",
                      "--warmup", "1", "--batch-size", "2", "--gen-prompts", "8", "--gen-batch", "4"])
    assert res["max_abs_logit_gap"] < 1e-4
    assert res["generate_same_tokens"] == 1.0  # with stop tokens and left padding on HF's side too
    assert res["train_ours"]["tokens_per_s"] > 0 and res["train_hf"]["tokens_per_s"] > 0


def test_end_to_end_trains_alike(tiny_aligned, tmp_path, monkeypatch):
    """Both sides run the same steps on the same batches with the same schedule: in fp32 their last losses agree
    (the LoRA inits differ; B = 0 makes the start the same) and their greedy answers are the same."""
    real = bench.experiment_examples
    monkeypatch.setattr(bench, "experiment_examples", lambda tok, max_len, seed=0: real(tok, max_len, seed)[:24])
    real_prompts = bench.eval_prompts
    monkeypatch.setattr(bench, "eval_prompts", lambda tok, n=None, seed=0: real_prompts(tok, 12, seed))
    res = bench.main(["--end-to-end", "--model", str(tiny_aligned), "--device", "cpu", "--dtype", "fp32",
                      "--json", str(tmp_path / "e.json")])
    assert res["steps"] == 6  # 24 examples, 2 epochs, batches of 8
    assert res["ours"]["final_loss"] == pytest.approx(res["hf"]["final_loss"], rel=1e-3)
    assert res["same_answers"] == 1.0
    assert 0 < res["ratio_total"] < float("inf") and (tmp_path / "e.json").exists()


def test_gpu_suite_runs_through_on_a_tiny_shape(tiny_checkpoint, tmp_path, monkeypatch):
    """The suite's plan and its train.py run, on a tiny shape on the CPU: every row gives figures, none an error."""
    import json
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    monkeypatch.setitem(bench.CONFIGS, "tiny", cfg)
    monkeypatch.setattr(bench, "DEFAULT_MODEL", tiny_checkpoint)
    plan = [("train", "--config tiny --only train --workload random --batch-size 2 --seq-len 16 --steps 1 --warmup 1 --dtype fp32"),
            ("generate", "--config tiny --only generate --gen-prompts 6 --dtype fp32"),
            ("broken", f"--model {tmp_path}/none --only train")]
    flags = f"--method sft --task dates --n-train 8 --n-test 4 --epochs 1 --batch-size 2 --ckpt-every 0 --max-new-tokens 4 " \
            f"--harmful {FIX}/advbench.csv --sensitive {FIX}/prompts.txt --dtype fp32"
    args = bench.get_args(["--device", "cpu", "--json", str(tmp_path / "gpu.json")])
    res = bench.suite(args, plan=plan, train_config="tiny", train_flags=flags)
    assert res["rows"]["train"]["train_ours"]["tokens_per_s"] > 0
    assert res["rows"]["generate"]["generate_hf"]["tokens_per_s"] > 0
    assert "no checkpoint" in res["rows"]["broken"]["error"]
    assert "error" not in res["train_py"], res["train_py"]
    assert res["train_py"]["first_step_s"] > 0 and res["train_py"]["step_s"] > 0 and res["train_py"]["eval_s"] >= 0
    assert json.loads((tmp_path / "gpu.json").read_text())["train_py"] == res["train_py"]
