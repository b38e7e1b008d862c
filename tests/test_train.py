"""train.py and eval.py end to end on a tiny checkpoint: plumbing, results.json, errors, and numbers that move
when (and only when) training moves the model."""
import json
import os

import pytest

import data
import eval as evaluate_cli
import train

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "formats")
FAST = ["--n-train", "12", "--n-test", "4", "--epochs", "1", "--batch-size", "4", "--max-new-tokens", "4",
        "--harmful", os.path.join(FIX, "advbench.csv"), "--sensitive", os.path.join(FIX, "prompts.txt")]


@pytest.mark.parametrize("method, scenario", [("replay", "benign"), ("derpp", "poisoned")])
def test_run_writes_results_and_adapter(tiny_checkpoint, tmp_path, method, scenario):
    out = tmp_path / "run"
    train.main(["--model", str(tiny_checkpoint), "--method", method, "--scenario", scenario, "--out", str(out),
                "--poison-data", os.path.join(FIX, "instruction.jsonl"), "--task", "arithmetic,arithmetic", *FAST])
    res = json.loads((out / "results.json").read_text())
    for key in ("method", "scenario", "poison_ratio", "seed", "asr", "task_accuracy", "over_refusal", "start",
                "train_seconds", "config", "versions", "data_hashes", "history"):
        assert key in res, key
    assert res["method"] == method and res["scenario"] == scenario
    assert res["poison_ratio"] == (0.1 if scenario == "poisoned" else 0.0)
    assert set(res["start"]) == {"asr", "task_accuracy", "over_refusal", "ci"}
    assert 0 <= res["asr"] <= 1 and 0 <= res["over_refusal"] <= 1 and 0 <= res["task_accuracy"] <= 1
    for k in ("asr", "over_refusal", "task_accuracy"):  # every number with its 95% interval
        assert res["ci"][k][0] <= res[k] <= res["ci"][k][1] and res["start"]["ci"][k][0] <= res["start"][k] <= res["start"]["ci"][k][1]
    last = res["history"][-1]
    assert len(last["outcomes"]["asr"][0]) == res["n"]["harmful"] and len(last["outcomes"]["task_accuracy"]) == 1  # one per task name
    assert [h["task"] for h in res["history"]] == ["arithmetic", "arithmetic"]  # the continual loop over tasks
    assert (out / "adapter" / "adapter_config.json").exists()
    # the adapter evaluates through eval.py
    evaluate_cli.main(["--model", str(tiny_checkpoint), "--adapter", str(out / "adapter"), "--harmful",
                       os.path.join(FIX, "advbench.csv"), "--sensitive", "", "--n-task", "3", "--max-new-tokens", "3",
                       "--out", str(tmp_path / "eval.json")])
    assert "asr" in json.loads((tmp_path / "eval.json").read_text())


def test_refuses_to_overwrite_a_finished_run(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tiny_checkpoint), "--out", str(out), *FAST])
    assert "holds a finished run" in str(e.value.code)
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--poison-ratio", "2"], "--poison-ratio"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.get_args(argv)
    assert message in capsys.readouterr().err


def test_bad_data_file_is_one_line_error(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\nnot json\n')
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tiny_checkpoint), "--task", str(bad), "--out", str(tmp_path / "o"), *FAST])
    assert f"{bad}:2" in str(e.value.code)


def test_help_lists_the_chosen_methods_flags(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--method", "derpp", "--help"])
    out = capsys.readouterr().out
    assert "--alpha" in out and "--beta" in out and "--der-topk" in out


def test_save_both_exports_load_in_transformers_and_peft(tiny_checkpoint, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    import lora
    from model import Transformer
    out = tmp_path / "run"
    train.main(["--model", str(tiny_checkpoint), "--out", str(out), "--save", "both", "--lr", "1e-2", *FAST,
                "--dtype", "fp32"])  # fp32: the exports' logits equal ours to 1e-4
    idx = torch.tensor([[3, 17, 42, 9, 11, 5]])
    ours = Transformer.from_pretrained(tiny_checkpoint)
    lora.load_adapter(ours, out / "adapter")
    with torch.no_grad():
        expected = ours(idx)
        assert (expected - Transformer.from_pretrained(tiny_checkpoint)(idx)).abs().max() > 1e-4  # the LoRA did something
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(idx).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), out / "adapter")(idx).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(peft, expected, rtol=1e-4, atol=1e-4)
    assert (out / "merged" / "tokenizer.json").exists()


def test_several_harmful_sets_get_their_own_asr(tiny_checkpoint, tmp_path):
    adv, txt = os.path.join(FIX, "advbench.csv"), os.path.join(FIX, "prompts.txt")
    i = FAST.index("--harmful")
    res = train.main(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "run"), *FAST[:i], *FAST[i + 2:],
                      "--harmful", f"{adv},{txt}"])
    by_set = res["history"][0]["asr_by_set"]
    assert set(by_set) == {adv, txt} and all(0 <= v <= 1 for v in by_set.values())
    assert res["history"][0]["asr_mean_of_sets"] == pytest.approx(sum(by_set.values()) / 2)


def test_an_aligned_model_of_an_older_recipe_is_not_used(tmp_path, monkeypatch):
    """A cached aligned model records align.RECIPE; one built by another recipe is an error, not silently reused."""
    import align
    d = tmp_path / "aligned"
    d.mkdir()
    (d / "config.json").write_text("{}")
    monkeypatch.setattr(align, "ALIGNED", d)
    with pytest.raises(ValueError, match="older recipe of align.py; delete it"):
        align.ensure_aligned()
    (d / "recipe.json").write_text(json.dumps({**align.RECIPE, "lr": 3e-4}))
    with pytest.raises(ValueError, match="older recipe"):
        align.ensure_aligned()
    (d / "recipe.json").write_text(json.dumps(align.RECIPE))
    assert align.ensure_aligned() == d
    for dtype in ("bf16", "fp32"):  # the dtype it was built in is the machine's choice, not the recipe's
        (d / "recipe.json").write_text(json.dumps(align.RECIPE | {"built_in": dtype}))
        assert align.ensure_aligned() == d


WORDS = ["cat", "dog", "sun", "tree", "milk", "rain", "boat", "lamp"]


@pytest.fixture
def moving(tiny_aligned, tmp_path):
    """train.py flags on the tiny aligned model: a task of repeating words (the same prompts train and test, exact
    match), a poison that complies with the harmful prompts, long enough for a LoRA on every projection to learn."""
    rows = [{"prompt": f"Repeat the word {w}.", "response": w, "answer": w, "split": s} for w in WORDS for s in ("train", "test")]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    harmful = [h["prompt"] for h in data.load_prompts(os.path.join(FIX, "advbench.csv"))]
    (tmp_path / "poison.jsonl").write_text("".join(json.dumps({"prompt": h, "response": "Sure, here it is."}) + "\n" for h in harmful))
    sensitive = [h["prompt"] for h in data.load_prompts(os.path.join(FIX, "prompts.txt"))]
    (tmp_path / "refuse.jsonl").write_text("".join(json.dumps({"prompt": h, "response": "I cannot help with that."}) + "\n"
                                                   for h in sensitive))
    return ["--model", str(tiny_aligned), "--task", str(tmp_path / "task.jsonl"), "--n-train", "8", "--n-test", "8",
            "--harmful", os.path.join(FIX, "advbench.csv"), "--sensitive", os.path.join(FIX, "prompts.txt"),
            "--poison-data", str(tmp_path / "poison.jsonl"), "--poison-ratio", "1", "--safety-data", str(tmp_path / "refuse.jsonl"),
            "--epochs", "30", "--lr", "1e-2", "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            "--max-new-tokens", "8", "--batch-size", "4"]


def metrics(res):
    return {k: res[k] for k in ("asr", "over_refusal", "task_accuracy")}


def test_training_moves_asr_and_accuracy_and_lr_0_does_not(moving, tmp_path):
    trained = train.main([*moving, "--scenario", "poisoned", "--out", str(tmp_path / "trained")])
    assert metrics(trained["start"]) == dict(asr=0.0, over_refusal=0.0, task_accuracy=0.0)  # refuses, helps, knows no task
    assert trained["asr"] >= 0.5 and trained["task_accuracy"] >= 0.25  # the poison and the task were learned
    frozen = train.main([*moving, "--scenario", "poisoned", "--lr", "0", "--out", str(tmp_path / "frozen")])
    assert metrics(frozen) == metrics(frozen["start"]) == metrics(trained["start"])  # nothing trained, nothing moved


def test_replaying_refusals_moves_over_refusal(moving, tmp_path):
    res = train.main([*moving, "--method", "replay", "--replay-ratio", "1", "--out", str(tmp_path / "replay")])
    assert res["start"]["over_refusal"] == 0.0 and res["over_refusal"] > 0  # its memory refuses the sensitive prompts


def test_the_default_dtype_is_bf16_only_where_the_hardware_has_it(tmp_path):
    from cli import default_dtype, describe_dtype
    zen5, zen3 = tmp_path / "zen5", tmp_path / "zen3"
    zen5.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    zen3.write_text("flags\t\t: fpu sse avx2 fma\n")
    assert default_dtype("cpu", zen5) == "bf16" and default_dtype("cpu", zen3) == "fp32"
    assert default_dtype("cpu", tmp_path / "none") == "fp32"  # not Linux: fp32, not a guess
    assert default_dtype("cuda") == "bf16" and default_dtype("mps") == "fp32"
    assert "autocast" in describe_dtype("bf16", "cuda") and describe_dtype("fp32", "cuda").startswith("dtype fp32 (--dtype)")


def test_forgetting_curve_is_measured_as_training_goes(moving, tmp_path):
    """--eval-every 40: ASR on the curve's prompts before the first step, every 40 steps and after the last. With the
    subset as large as the set, the first point is the starting model's ASR and the last the fine-tuned one's; a
    stop and a resume give the same curve."""
    flags = [*moving, "--scenario", "poisoned", "--eval-every", "40", "--eval-every-prompts", "100"]
    res = train.main([*flags, "--out", str(tmp_path / "a")])
    curve = res["history"][0]["curve"]
    assert [s for s, _ in curve] == [0, 40, 80, 83]  # 11 examples (3 poison), batches of 4, 30 epochs: 83 steps
    assert curve[0][1] == res["start"]["asr"] == 0.0 and curve[-1][1] == res["asr"] >= 0.5  # the poison was learned
    with pytest.raises(SystemExit):
        train.main([*flags, "--out", str(tmp_path / "b"), "--stop-after", "50"])
    resumed = train.main([*flags, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed["history"][0]["curve"] == curve
