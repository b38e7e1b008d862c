"""Parity of model.py with Hugging Face transformers on tiny random checkpoints of every family: a full forward
pass, and cached generation token by token (alone and in a left-padded batch), in fp32 to 1e-4."""
import json

import pytest
import torch

from config import ModelConfig
from conftest import edit_config
from model import Transformer

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
# Gemma 3: linear scaling of the global layers' RoPE (as the 4B+ models), the local layers' own base
GEMMA3_ROPE = {"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=100000.0),
               "sliding_attention": dict(rope_type="default", rope_theta=1000.0)}
# the vision tower of a tiny gemma3 (vision-language) checkpoint, which we leave unread
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, image_size=28, patch_size=14)
FAMILIES = {
    "llama-gqa-llama3-rope": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-tied-mqa": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-linear-rope-bias": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0), attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(head_dim=32, num_attention_heads=4, num_key_value_heads=1)),
    "llama-exact-gelu": ("LlamaConfig", dict(hidden_act="gelu")),  # transformers' "gelu" is exact, not tanh
    # sliding windows of 8 < the 40 tokens of the tests; head_dim free of hidden_size / heads (64 / 4)
    "mistral-sliding": ("MistralConfig", dict(sliding_window=8)),
    "qwen2-sliding": ("Qwen2Config", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
    "qwen3-sliding": ("Qwen3Config", dict(head_dim=24, num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                                          max_window_layers=2, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                    final_logit_softcapping=3.0, attn_logit_softcapping=2.0)),  # small caps: they bite
    "gemma3_text": ("Gemma3TextConfig", dict(num_hidden_layers=4, head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                             sliding_window_pattern=3, rope_parameters=GEMMA3_ROPE)),
    "gemma3": ("Gemma3Config", dict(num_hidden_layers=3, head_dim=32, sliding_window=8, sliding_window_pattern=2)),
}
NEW = ["mistral-sliding", "qwen2-sliding", "qwen3", "qwen3-sliding", "gemma2", "gemma3_text", "gemma3"]


def make_hf(kind, tmp_path, seed=0):
    cls, extra = FAMILIES[kind]
    torch.manual_seed(seed)
    if cls == "Gemma3Config":  # our model is its text tower; image tokens out of the way, past the test's ids
        cfg = transformers.Gemma3Config(text_config={**BASE, **extra}, vision_config=SIGLIP, mm_tokens_per_image=4,
                                        boi_token_index=97, eoi_token_index=98, image_token_index=99)
    else:
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


def hf_cached_logits(hf, ids, prefill):
    """transformers' own cached generation, one token at a time after a prefill: logits (T - prefill + 1, vocab)."""
    with torch.no_grad():
        out = hf(torch.tensor([ids[:prefill]]), use_cache=True)
        rows, cache = [out.logits[0, -1]], out.past_key_values
        for t in ids[prefill:]:
            out = hf(torch.tensor([[t]]), past_key_values=cache, use_cache=True)  # transformers 5.x also says cache=
            rows.append(out.logits[0, -1])
            cache = out.past_key_values
    return torch.stack(rows)


def our_cached_logits(model, rows, prefill):
    """Our KV-cache path as generate.py drives it (left padding, per-row positions, a key mask), fed the given ids
    after a prefill of each row's first prefill[i] ids: per row, logits (len - prefill + 1, vocab)."""
    B, P, n = len(rows), max(prefill), len(rows[0]) - prefill[0]
    assert all(len(r) - p == n for r, p in zip(rows, prefill))
    L = P + n + 3
    idx, key_mask = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, L, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, prefill)):
        idx[i, P - p:], key_mask[i, P - p:P] = torch.tensor(r[:p]), True
    positions = (key_mask[:, :P].long().cumsum(-1) - 1).clamp(min=0)
    model.setup_cache(B, L)
    with torch.no_grad():
        out = [model(idx, positions=positions, input_pos=torch.arange(P), key_mask=key_mask)[:, -1]]
        pos = positions[:, -1:]
        for t in range(n):
            pos, key_mask[:, P + t] = pos + 1, True
            tok = torch.tensor([[r[p + t]] for r, p in zip(rows, prefill)])
            out.append(model(tok, positions=pos, input_pos=torch.tensor([P + t]), key_mask=key_mask)[:, -1])
    model.clear_cache()
    return torch.stack(out, 1)  # (B, n + 1, vocab)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("kind", NEW)
def test_cached_generation_matches_transformers_alone_and_batched(kind, tmp_path):
    """Token by token past the sliding window (prefill 5, then 30 steps): our cache = transformers' cache, and a
    row's logits do not change when it is decoded in a left-padded batch with longer and shorter rows."""
    hf, path = make_hf(kind, tmp_path)
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, BASE["vocab_size"], (n,), generator=g).tolist() for n in (35, 41, 38)]
    prefill = [5, 11, 8]
    batched = our_cached_logits(ours, rows, prefill)
    for i, (r, p) in enumerate(zip(rows, prefill)):
        want = hf_cached_logits(hf, r, p)
        alone = our_cached_logits(ours, [r], [p])[0]
        assert (alone - want).abs().max().item() <= 1e-4, (kind, i)
        assert (batched[i] - alone).abs().max().item() <= 1e-4, (kind, i)


@pytest.mark.parametrize("kind", ["llama-gqa-llama3-rope", "gemma", "qwen2", "qwen3-sliding", "gemma2", "gemma3_text", "gemma3"])
def test_save_pretrained_loads_in_transformers(kind, tmp_path):
    _, path = make_hf(kind, tmp_path)
    ours = Transformer.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    idx = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert (ours(idx) - back(idx).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", NEW)
def test_lora_adapter_and_merged_model_load_in_peft_and_transformers(kind, tmp_path):
    """A LoRA on every linear layer of each new family: PEFT applies our adapter to transformers' model with our
    logits, and the merged model saved by save_pretrained is the same model in transformers. A gemma3 checkpoint's
    adapter is for its text tower, the gemma3_text checkpoint save_pretrained writes."""
    import lora
    peft = pytest.importorskip("peft")
    hf, path = make_hf(kind, tmp_path)
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    if kind == "gemma3":
        ours.save_pretrained(tmp_path / "text")
        path, hf = tmp_path / "text", transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text").float().eval()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora.apply_lora(ours, rank=4, alpha=8, targets=targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora.lora_parameters(ours):
            p.normal_(0, 0.1)
    lora.save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(path))
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    idx = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        want = ours(idx)
        assert (want - theirs(idx).logits).abs().max().item() <= 1e-4
        lora.merge(ours)
        ours.save_pretrained(tmp_path / "merged")
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
        assert (want - merged(idx).logits).abs().max().item() <= 1e-4


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


@pytest.mark.parametrize("kind, changes, message", [
    ("qwen3", dict(model_type="qwen3_moe"), "model_type 'qwen3_moe' is not supported"),
    ("qwen3", dict(layer_types=["full_attention", "sliding_attention"]), "no sliding window is set"),
    ("qwen3-sliding", dict(max_window_layers=-1), "max_window_layers"),
    ("qwen3-sliding", dict(layer_types=["full_attention"] * 2), "layer_types must list 3 entries"),
    ("gemma2", dict(layer_types=["global", "local", "global"]), "layer_types must list"),
    ("gemma2", dict(sliding_window=None), "no sliding window is set"),
    ("gemma2", dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    ("gemma2", dict(attn_logit_softcapping="50"), "attn_logit_softcapping"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "default"},
                                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "rope scaling of the sliding-window layers"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0}}), "rope scaling type 'yarn'"),
    ("gemma3", dict(text_config=None), "needs a text_config"),
])
def test_bad_config_of_the_new_families(tmp_path, kind, changes, message):
    _, path = make_hf(kind, tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=message) as e:
        Transformer.from_pretrained(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["qwen2-sliding", "qwen3-sliding", "gemma2", "gemma3_text"])
def test_layer_types_derived_as_transformers_does_when_absent(kind, tmp_path):
    """Files written before transformers listed layer_types: Qwen's max_window_layers, Gemma 2's alternation and
    Gemma 3's sliding_window_pattern decide which layers slide."""
    _, path = make_hf(kind, tmp_path)
    edit_config(path, layer_types=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    assert ours.sliding == [t == "sliding_attention" for t in hf.config.layer_types] and any(ours.sliding)
    idx = torch.randint(0, BASE["vocab_size"], (1, 40))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_gemma3_text_config_takes_transformers_defaults(tmp_path):
    """A real gemma3 config.json's text_config lists only what differs from Gemma3TextConfig (Gemma 3 4B's: sizes,
    sliding_window, rope_scaling): the rest are transformers' defaults, as transformers reads them."""
    cfg = ModelConfig.from_hf({"model_type": "gemma3", "eos_token_id": [1, 106], "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}})
    want = transformers.Gemma3TextConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                         rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
    assert (cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (want.vocab_size, 8, 4, 256)
    assert cfg.layer_types == tuple(want.layer_types) and cfg.sliding_window == 1024
    assert (cfg.rope_theta, cfg.local_rope_theta, cfg.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    assert cfg.attn_scale == 256 ** -0.5 and cfg.tie_embeddings and cfg.hf["eos_token_id"] == [1, 106]
    assert cfg.hf["model_type"] == "gemma3_text"  # what save_pretrained writes: the text tower as its own model


def test_sliding_window_mask():
    """Key j visible to query i iff i - window < j <= i (transformers' sliding_window_overlay)."""
    from model import attention_mask
    i = torch.arange(6)
    m = attention_mask(i, i, window=3)
    assert m.tolist() == [[j <= q and q - 3 < j for j in range(6)] for q in range(6)]


def test_bf16_training_attention_on_a_cpu_equals_sdpa(monkeypatch):
    """A bf16 training step on a CPU computes attention explicitly (SDPA's flash backward is slow there): the same
    logits as SDPA's path, and gradients as near fp32's as bf16 allows."""
    import torch.nn.functional as F
    from conftest import tiny_model
    m, idx = tiny_model(), torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = m(idx).float()  # without grad: SDPA
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = m(idx).float()
    assert not calls  # the explicit path ran
    torch.testing.assert_close(explicit, sdpa, atol=0.05, rtol=0.05)
    explicit.logsumexp(-1).sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    monkeypatch.undo()
    m.zero_grad()
    m(idx).logsumexp(-1).sum().backward()  # fp32: SDPA
    for g, p in zip(got, m.parameters()):
        assert (g - p.grad).norm() <= 0.03 * p.grad.norm()


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


@pytest.mark.parametrize("bias", [False, True])
def test_linear_of_a_decoding_step_equals_f_linear(bias, monkeypatch):
    # model.linear computes a CPU fp32 decode step's 12-64 rows as (W @ x.T).T; anything else goes to F.linear
    import model
    ref, calls = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: (calls.append(1), ref(*a))[1])
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 40, generator=g), torch.randn(96, generator=g) if bias else None
    for shape, transposed in [((12, 1, 40), True), ((16, 40), True), ((64, 1, 40), True), ((11, 1, 40), False),
                              ((65, 40), False), ((5, 16, 40), False)]:
        x, calls[:] = torch.randn(*shape, generator=g), []
        with torch.no_grad():
            got = model.linear(x, w, b)
        assert not calls if transposed else calls
        torch.testing.assert_close(got, ref(x, w, b))
        assert got.shape == (*shape[:-1], 96) and got.is_contiguous()
    x = torch.randn(16, 40, generator=g, requires_grad=True)  # with grad: F.linear, gradients as ever
    model.linear(x, w, b).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(16, 40))
