"""Every documented user error is one line starting with "error:" (no traceback), through train.main and eval.main.

Each test breaks a copy of the tiny checkpoint, a data file or a flag and checks the message says what and where.
"""
import json
import os
import shutil

import pytest
import torch

import eval as evaluate_cli
import train
from config import ModelConfig
from conftest import edit_config
from model import Transformer
from test_train import FAST, FIX


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint to break."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "model")


def error(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def train_error(model, tmp_path, *flags):
    return error(train.main, ["--model", str(model), "--out", str(tmp_path / "out"), *FAST, *flags])


def eval_error(model, *flags):
    return error(evaluate_cli.main, ["--model", str(model), "--harmful", os.path.join(FIX, "advbench.csv"), "--sensitive", "",
                                     "--task", "", "--max-new-tokens", "2", *flags])


# ---- the checkpoint -------------------------------------------------------------------------------------
def test_missing_model_directory(tmp_path):
    assert "tokenizer.json not found" in train_error(tmp_path / "nowhere", tmp_path)


def test_missing_config_json(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    assert f"{ckpt / 'config.json'}: not found" in train_error(ckpt, tmp_path)


def test_truncated_safetensors(ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert f"{f}: cannot read safetensors file" in train_error(ckpt, tmp_path)
    assert f"{f}: cannot read safetensors file" in eval_error(ckpt)


def test_corrupt_config_json(ckpt, tmp_path):
    (ckpt / "config.json").write_text('{"model_type": "llama",')
    assert "config.json:1: invalid JSON" in train_error(ckpt, tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn' is not supported"),
    (dict(hidden_act="relu2"), "hidden_act 'relu2' is not supported"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
])
def test_unsupported_config(ckpt, tmp_path, changes, message):
    edit_config(ckpt, **changes)
    assert message in train_error(ckpt, tmp_path)


def test_corrupt_tokenizer_json(ckpt, tmp_path):
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    assert f"{ckpt / 'tokenizer.json'}: cannot read" in train_error(ckpt, tmp_path)


def test_corrupt_tokenizer_config_json(ckpt, tmp_path):
    (ckpt / "tokenizer_config.json").write_text("{")
    assert "tokenizer_config.json:1: invalid JSON" in train_error(ckpt, tmp_path)


def test_tokenizer_larger_than_the_embedding(ckpt, tmp_path):
    edit_config(ckpt, vocab_size=100)  # the byte-level tokenizer has 256 bytes + specials
    assert "config.json's vocab_size is 100: the tokenizer does not belong to this model" in train_error(ckpt, tmp_path)
    assert "does not belong to this model" in eval_error(ckpt)


def test_tokenizer_smaller_than_the_embedding_is_fine(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    torch.manual_seed(0)  # an embedding padded to a multiple of 64, as many checkpoints have
    Transformer(ModelConfig.from_hf({**cfg, "vocab_size": cfg["vocab_size"] // 64 * 64 + 64})).save_pretrained(ckpt)
    evaluate_cli.main(["--model", str(ckpt), "--harmful", os.path.join(FIX, "advbench.csv"), "--sensitive", "",
                       "--task", "", "--max-new-tokens", "2"])


# ---- data -----------------------------------------------------------------------------------------------
def test_malformed_data_row(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    assert f"{bad}:2: missing field 'answer'" in train_error(tiny_checkpoint, tmp_path, "--task", str(bad))


def test_empty_task_file(tiny_checkpoint, tmp_path):
    empty = tmp_path / "task.jsonl"
    empty.write_text("")
    assert f"{empty}: no examples" in train_error(tiny_checkpoint, tmp_path, "--task", str(empty))


def test_empty_harmful_file(tiny_checkpoint, tmp_path):
    empty = tmp_path / "harmful.csv"
    empty.write_text("")
    assert f"{empty}: no examples" in train_error(tiny_checkpoint, tmp_path, "--harmful", str(empty))
    assert f"{empty}: no examples" in eval_error(tiny_checkpoint, "--harmful", str(empty))


def test_missing_data_file(tiny_checkpoint, tmp_path):
    assert "nope.jsonl: no such file" in train_error(tiny_checkpoint, tmp_path, "--task", str(tmp_path / "nope.jsonl"))


def test_prompt_longer_than_max_len(tiny_checkpoint, tmp_path):
    assert "the prompt alone is longer than --max-len 20" in train_error(tiny_checkpoint, tmp_path, "--max-len", "20")


def test_max_len_longer_than_the_models_context(tiny_checkpoint, tmp_path):
    msg = train_error(tiny_checkpoint, tmp_path, "--max-len", "600")
    assert "--max-len 600 is longer than the model's context (512 tokens" in msg


def test_eval_prompt_longer_than_the_models_context(tiny_checkpoint, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("a short prompt\n" + "a" * 600 + "\n")  # one token a byte
    assert f"{long}:2: a prompt of" in eval_error(tiny_checkpoint, "--harmful", str(long))
    assert "exceeds the model's context (512)" in eval_error(tiny_checkpoint, "--harmful", str(long))
    assert f"{long}:2: a prompt of" in train_error(tiny_checkpoint, tmp_path, "--harmful", str(long))


# ---- flags ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--method", "nope"], "error: --method 'nope': unknown method"),
    (["--scenario", "nope"], "error: argument --scenario: invalid choice"),
    (["--batch-size", "0"], "error: --batch-size must be positive"),
    (["--lr", "fast"], "error: argument --lr: invalid float value"),
    (["--epochs", "0"], "error: --epochs must be positive, got 0.0"),  # used to train one step and "finish"
    (["--epochs=-1"], "error: --epochs must be positive"),
    (["--lora-alpha", "0"], "error: --lora-alpha must be positive"),  # an adapter that changes nothing
    (["--lr=-1e-3"], "error: --lr must be >= 0, got -0.001"),
    (["--eval-batch-size", "0"], "error: --eval-batch-size must be positive"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be positive"),
    (["--lora-dropout", "1.5"], "error: --lora-dropout must be in [0, 1), got 1.5"),
    (["--warmup", "2"], "error: --warmup must be in [0, 1]"),
    (["--harmful", ""], "error: --harmful '': an empty name in the list"),  # used to read every CSV of the directory
    (["--task", "arithmetic,"], "error: --task 'arithmetic,': an empty name in the list"),
])
def test_bad_flag_is_a_usage_error(tiny_checkpoint, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), *FAST, *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--device", "nope"], "--device 'nope': not a device"),
    (["--lora-targets", "nope"], "--lora-targets nope: no linear layer of the model has that name"),
    (["--chat-format", "nope"], "unknown chat format 'nope'"),
    (["--thinking"], "--thinking: only the qwen3 chat format thinks, not 'chatml'"),
    (["--ckpt-every", "-1"], "--ckpt-every must be >= 0"),
    (["--stop-after", "3", "--ckpt-every", "0"], "--stop-after N needs N > 0 and checkpoints"),
    (["--scenario", "poisoned"], "--poison-data generated needs the default model"),
])
def test_bad_flag_value(tiny_checkpoint, tmp_path, flags, message):
    assert message in train_error(tiny_checkpoint, tmp_path, *flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(tiny_checkpoint, tmp_path):
    assert "--device cuda: no CUDA device is available" in train_error(tiny_checkpoint, tmp_path, "--device", "cuda")


def test_eval_bad_adapter(tiny_checkpoint, tmp_path):
    assert f"{tmp_path / 'nope' / 'adapter_config.json'}: not found" in eval_error(tiny_checkpoint, "--adapter", str(tmp_path / "nope"))
    out = tmp_path / "run"
    train.main(["--model", str(tiny_checkpoint), "--out", str(out), *FAST])
    f = out / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert f"{f}: cannot read safetensors file" in eval_error(tiny_checkpoint, "--adapter", str(out / "adapter"))


# ---- checkpoints (--resume) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(tiny_checkpoint, tmp_path_factory):
    """OUT of a run stopped after 1 step: a checkpoint and no results.json."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    with pytest.raises(SystemExit):
        train.main(["--model", str(tiny_checkpoint), "--out", str(out), *FAST, "--stop-after", "1"])
    return out


def resume_error(tiny_checkpoint, out, *flags):
    return error(train.main, ["--model", str(tiny_checkpoint), "--out", str(out), *FAST, "--resume", *flags])


def test_resume_without_a_checkpoint(tiny_checkpoint, tmp_path):
    assert "--resume: no checkpoint to resume from" in resume_error(tiny_checkpoint, tmp_path / "out")


def test_resume_from_a_corrupt_checkpoint(tiny_checkpoint, tmp_path, stopped):
    out = shutil.copytree(stopped, tmp_path / "out")
    manifest = out / "ckpt" / "manifest.json"
    f = out / "ckpt" / json.loads(manifest.read_text())["tensors"]
    f.write_bytes(f.read_bytes()[:-10])
    assert f"{f}: cannot read the checkpoint" in resume_error(tiny_checkpoint, out)
    f.unlink()
    assert f"{f}: cannot read the checkpoint" in resume_error(tiny_checkpoint, out)
    manifest.write_text(manifest.read_text()[:50])
    assert f"{manifest}:" in resume_error(tiny_checkpoint, out) and "invalid JSON" in resume_error(tiny_checkpoint, out)
    manifest.write_text("{}")
    assert f"{manifest}: not a checkpoint of this train.py" in resume_error(tiny_checkpoint, out)


def test_resume_with_other_flags(tiny_checkpoint, tmp_path, stopped):
    out = shutil.copytree(stopped, tmp_path / "out")
    assert "--resume: the stopped run had --lr 0.001, this one 0.01" in resume_error(tiny_checkpoint, out, "--lr", "0.01")


def test_a_stopped_run_is_not_restarted_without_resume_or_overwrite(tiny_checkpoint, tmp_path, stopped):
    out = shutil.copytree(stopped, tmp_path / "out")
    msg = train_error(tiny_checkpoint, tmp_path)
    assert f"--out {out}: holds a stopped run" in msg and "pass --resume" in msg
    assert (out / "ckpt" / "manifest.json").exists()


def test_resume_after_the_data_changed(tiny_checkpoint, tmp_path):
    harmful = shutil.copy(os.path.join(FIX, "advbench.csv"), tmp_path / "harmful.csv")
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        train.main(["--model", str(tiny_checkpoint), "--out", str(out), *FAST, "--harmful", str(harmful), "--stop-after", "1"])
    with open(harmful, "a") as f:
        f.write("Another prompt,Sure\n")
    assert "--resume: the data files changed" in resume_error(tiny_checkpoint, out, "--harmful", str(harmful))


# ---- nothing lost, found before the work ----------------------------------------------------------------
def test_an_unwritable_out_is_found_before_any_work(tiny_checkpoint, tmp_path):
    (tmp_path / "out").write_text("")
    assert f"--out {tmp_path / 'out'}: exists and is not a directory" in train_error(tiny_checkpoint, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: nothing to test
            pytest.skip("this user can write a read-only directory")
        assert f"--out {locked / 'out'}: cannot write there" in train_error(tiny_checkpoint, locked)
    finally:
        locked.chmod(0o700)


def test_overwrite_with_a_bad_task_keeps_the_finished_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert "nope.jsonl: no such file" in train_error(tiny_checkpoint, tmp_path, "--overwrite", "--task", str(tmp_path / "nope.jsonl"))
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--n-task", "0"], "--n-task must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
])
def test_eval_bad_flag_value(tiny_checkpoint, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main(["--model", str(tiny_checkpoint), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eval_out_a_directory_is_an_error_before_the_work(tiny_checkpoint, tmp_path):
    assert f"--out {tmp_path}: a directory; give a file path" in eval_error(tiny_checkpoint, "--out", str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_cuda_without_a_gpu(tiny_checkpoint):
    assert "--device cuda: no CUDA device is available" in eval_error(tiny_checkpoint, "--device", "cuda")


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    from files import write_json
    (tmp_path / "a").mkdir()
    with pytest.raises(OSError):
        write_json(tmp_path / "a", {"x": 1})  # a directory is in the way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("change, message", [
    (dict(alpha_pattern={"q_proj": 32}), "alpha_pattern (per-layer LoRA settings) is not supported"),
    (dict(rank_pattern={"v_proj": 2}), "rank_pattern (per-layer LoRA settings) is not supported"),
    (dict(r=None), "field 'r' is missing or not a valid positive integer"),
    (dict(target_modules=["nope"]), "target_modules ['nope']: no linear layer"),
])
def test_eval_adapter_config_that_we_cannot_honour(tiny_checkpoint, tmp_path, change, message):
    import lora
    model = lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)
    lora.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg = {k: v for k, v in {**cfg, **change}.items() if v is not None}
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    assert message in eval_error(tiny_checkpoint, "--adapter", str(tmp_path / "ad"))


def test_integer_weights_and_an_index_without_weight_map(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(ckpt / "model.safetensors"))
    name = next(iter(sd))
    save_file({**sd, name: sd[name].to(torch.int32)}, str(ckpt / "model.safetensors"))
    assert f"tensor {name!r} is int32, not floating point" in train_error(ckpt, tmp_path)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    assert "model.safetensors.index.json: no 'weight_map'" in train_error(ckpt, tmp_path)


def test_saved_tensors_follow_the_umask(tiny_checkpoint, tmp_path):
    import lora
    old = os.umask(0o022)
    try:
        model = lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)
        lora.save_adapter(model, tmp_path / "ad")
        model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for f in (tmp_path / "ad" / "adapter_model.safetensors", tmp_path / "m" / "model.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o644, f


@pytest.mark.parametrize("change, message", [
    (dict(step=10 ** 6), "the checkpoint is at step 1000000 of task 1/1"),  # used to "finish" without training
    (dict(step="3"), "field 'step' is '3', not what train.py writes there"),
    (dict(task=-1), "field 'task' is -1"),
    (dict(history={}), "field 'history' is {}"),
    (dict(tensors="../x"), "field 'tensors' must name a file in"),
])
def test_resume_from_a_manifest_with_a_bad_field(tiny_checkpoint, tmp_path, stopped, change, message):
    out = moved(stopped, tmp_path / "out")
    manifest = out / "ckpt" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **change}))
    assert message in resume_error(tiny_checkpoint, out)


def moved(stopped, out):
    """A copy of the stopped run whose config names its new --out, so that --resume there is valid."""
    shutil.copytree(stopped, out)
    meta = json.loads((out / "ckpt" / "manifest.json").read_text())
    (out / "ckpt" / "manifest.json").write_text(json.dumps({**meta, "config": {**meta["config"], "out": str(out)}}))
    return out


def test_resume_from_tensors_of_another_run(tiny_checkpoint, tmp_path, stopped):
    from safetensors.torch import load_file, save_file
    out = moved(stopped, tmp_path / "out")
    f = out / "ckpt" / json.loads((out / "ckpt" / "manifest.json").read_text())["tensors"]
    save_file({k: v for k, v in load_file(str(f)).items() if "lora_A" not in k}, str(f))
    assert "the checkpoint's tensors lack" in resume_error(tiny_checkpoint, out)


def test_eval_out_in_a_new_folder_is_made(tiny_checkpoint, tmp_path):
    evaluate_cli.main(["--model", str(tiny_checkpoint), "--harmful", os.path.join(FIX, "advbench.csv"), "--sensitive", "",
                       "--task", "", "--max-new-tokens", "2", "--out", str(tmp_path / "new" / "res.json")])
    assert (tmp_path / "new" / "res.json").exists()


def test_one_place_turns_expected_errors_into_one_line():
    from cli import one_line_errors
    for err in (ValueError("x.csv:3: bad"), FileNotFoundError("nowhere: not found")):
        with pytest.raises(SystemExit) as e, one_line_errors():
            raise err
        assert e.value.code == f"error: {err}"
    with pytest.raises(TypeError), one_line_errors():  # a bug keeps its traceback
        raise TypeError("a bug")


def test_data_files_are_checked_before_any_model_loads(tmp_path):
    bad = tmp_path / "task.jsonl"
    bad.write_text("not json\n")
    assert f"{bad}:1: bad JSON" in train_error(tmp_path / "no-model-here", tmp_path, "--task", str(bad))
