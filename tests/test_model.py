"""Parity of model.py with Hugging Face transformers on tiny random checkpoints of every family."""
import json

import pytest
import torch

from conftest import edit_config
from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
FAMILIES = {
    "llama-gqa-llama3-rope": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-tied-mqa": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-linear-rope-bias": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0), attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(head_dim=32, num_attention_heads=4, num_key_value_heads=1)),
    "llama-exact-gelu": ("LlamaConfig", dict(hidden_act="gelu")),  # transformers' "gelu" is exact, not tanh
}


def make_hf(kind, tmp_path, seed=0):
    cls, extra = FAMILIES[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{**BASE, **extra})
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms so that (1+w) vs w mistakes show up
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / kind)
    return hf, tmp_path / kind


@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_match_transformers(kind, tmp_path):
    hf, path = make_hf(kind, tmp_path)
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    idx = torch.randint(0, BASE["vocab_size"], (2, 40))  # 40 > original_max_position_embeddings: llama3 scaling matters
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("kind", ["llama-gqa-llama3-rope", "gemma", "qwen2"])
def test_save_pretrained_loads_in_transformers(kind, tmp_path):
    _, path = make_hf(kind, tmp_path)
    ours = Transformer.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    idx = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert (ours(idx) - back(idx).logits).abs().max().item() <= 1e-5


def test_sharded_round_trip(tmp_path):
    _, path = make_hf("llama-gqa-llama3-rope", tmp_path)
    ours = Transformer.from_pretrained(path)
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = Transformer.from_pretrained(tmp_path / "sharded")
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").float().eval()
    idx = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert (ours(idx) - back(idx).logits).abs().max().item() <= 1e-5


def test_load_dtype(tmp_path):
    _, path = make_hf("qwen2", tmp_path)
    m = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.lm_head.weight is m.model.embed_tokens.weight


# ---- errors: each bad input names what is wrong -----------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0), rope_parameters=None), "rope scaling type 'yarn'"),
    (dict(hidden_act="relu2"), "hidden_act 'relu2'"),
    (dict(num_key_value_heads=3), "not a multiple"),
    (dict(intermediate_size=100), "has shape"),
])
def test_bad_config(tmp_path, changes, message):
    _, path = make_hf("llama-gqa-llama3-rope", tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=message):
        Transformer.from_pretrained(path)


def test_sliding_window_shorter_than_sequence_is_an_error():
    cfg = ModelConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 8})
    m = Transformer(cfg)
    m(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding window"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_missing_unknown_and_truncated_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = make_hf("llama-gqa-llama3-rope", tmp_path)
    f = path / "model.safetensors"
    sd = load_file(f)
    save_file({**sd, "model.extra.weight": torch.zeros(1)}, f)
    with pytest.raises(ValueError, match="unknown tensor 'model.extra.weight'"):
        Transformer.from_pretrained(path)
    del sd["model.norm.weight"]
    save_file(sd, f)
    with pytest.raises(ValueError, match="missing tensor 'model.norm.weight'"):
        Transformer.from_pretrained(path)
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read safetensors"):
        Transformer.from_pretrained(path)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(path)
