"""Property-based fuzz of config.json and adapter_config.json: each field dropped, nulled, retyped or zeroed.

A load either fails with a one-line ValueError / OSError, or gives the logits transformers (PEFT) gives for the
same files; never a traceback of another type, never a silently different model.
"""
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import lora
from model import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

MUTATIONS = ["drop", None, "text", 0, -1, 1.5, True, [1], {}]
IDX = torch.arange(20)[None]


def mutate(cfg, field, how):
    cfg = dict(cfg)
    if how == "drop":
        cfg.pop(field, None)
    elif how == "text":
        cfg[field] = str(cfg.get(field))
    else:
        cfg[field] = how
    return cfg


def ours_or_error(load):
    """The model our loader builds, or None after checking its error is a clean one-liner."""
    try:
        return load()
    except (ValueError, OSError) as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return None


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory):
    model = lora.apply_lora(Transformer.from_pretrained(tiny_checkpoint), rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("adapter")
    lora.save_adapter(model, path)
    return path


FIELDS = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
          "rope_scaling", "hidden_act", "head_dim", "attention_bias", "mlp_bias"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), how=st.sampled_from(MUTATIONS))
def test_config_json_fuzz(tiny_checkpoint, tmp_path_factory, field, how):
    path = tmp_path_factory.mktemp("cfg")
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / f, path / f)
    cfg = mutate(json.loads((tiny_checkpoint / "config.json").read_text()), field, how)
    (path / "config.json").write_text(json.dumps(cfg))
    ours = ours_or_error(lambda: Transformer.from_pretrained(path))
    if ours is None:
        return
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    except Exception:  # transformers refuses a file we accept: nothing to compare with
        return
    with torch.no_grad():
        assert (ours(IDX) - hf(IDX).logits).abs().max() <= 1e-4, (field, how)


# the new families' own fields, on tiny random checkpoints of each (tests/test_model.py)
FAMILY_FIELDS = ["head_dim", "sliding_window", "layer_types", "use_sliding_window", "max_window_layers", "query_pre_attn_scalar",
                 "attn_logit_softcapping", "final_logit_softcapping", "rope_parameters", "rope_local_base_freq",
                 "sliding_window_pattern", "use_bidirectional_attention", "hidden_activation", "tie_word_embeddings",
                 "num_key_value_heads", "model_type"]


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    from test_model import make_hf
    root = tmp_path_factory.mktemp("families")
    return {kind: make_hf(kind, root)[1] for kind in ("qwen3-sliding", "gemma2", "gemma3_text")}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["qwen3-sliding", "gemma2", "gemma3_text"]), field=st.sampled_from(FAMILY_FIELDS),
       how=st.sampled_from(MUTATIONS))
def test_new_family_config_fuzz(family_checkpoints, tmp_path_factory, kind, field, how):
    src, path = family_checkpoints[kind], tmp_path_factory.mktemp("fam")
    shutil.copy(src / "model.safetensors", path / "model.safetensors")
    cfg = mutate(json.loads((src / "config.json").read_text()), field, how)
    (path / "config.json").write_text(json.dumps(cfg))
    ours = ours_or_error(lambda: Transformer.from_pretrained(path))
    if ours is None:
        return
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    except Exception:  # transformers refuses a file we accept: nothing to compare with
        return
    with torch.no_grad():
        assert (ours(IDX) - hf(IDX).logits).abs().max() <= 1e-4, (kind, field, how)


ADAPTER_FIELDS = ["r", "lora_alpha", "target_modules", "lora_dropout", "peft_type", "use_dora", "use_rslora",
                  "alpha_pattern", "rank_pattern", "bias"]


@settings(max_examples=110, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(ADAPTER_FIELDS), how=st.sampled_from(MUTATIONS + [{"q_proj": 2}]))
def test_adapter_config_json_fuzz(tiny_checkpoint, adapter_dir, tmp_path_factory, field, how):
    path = tmp_path_factory.mktemp("ad")
    shutil.copy(adapter_dir / "adapter_model.safetensors", path)
    cfg = mutate(json.loads((adapter_dir / "adapter_config.json").read_text()), field, how)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    ours = ours_or_error(lambda: lora.load_adapter(Transformer.from_pretrained(tiny_checkpoint), path))
    if ours is None:
        return
    try:
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, path).eval()
    except Exception:  # PEFT refuses a file we accept: nothing to compare with
        return
    with torch.no_grad():
        assert (ours(IDX) - theirs(IDX).logits).abs().max() <= 1e-4, (field, how)
