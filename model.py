"""A Llama-style decoder for the families our users bring, loaded from Hugging Face safetensors.

One `Transformer` covers Llama 2/3.x (incl. the "llama3" RoPE scaling of 3.1/3.2), Mistral (sliding window),
Qwen2/2.5 (q/k/v bias, optional sliding window), Qwen3 (RMSNorm on each q/k head, free head_dim), Gemma 1
(GeGLU, (1+w) RMSNorm, sqrt(d) embedding scale), Gemma 2 (norms after attention and MLP too, soft-capped
attention scores and logits, query_pre_attn_scalar, alternating sliding-window and global layers), Gemma 3
text (q/k norms, local layers with their own RoPE base, 5 local : 1 global; also the text tower of a `gemma3`
vision-language checkpoint) and SmolLM, with GQA/MQA and tied or untied embeddings. Module names mirror the
Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj.weight`), so loading is a checked one-to-one
copy, no renaming. Every formula was checked against transformers 5.x (models/<family>/modeling_*.py) and is
tested against it on tiny random checkpoints (tests/test_model.py).

Sliding-window attention is an explicit SDPA mask (key j visible to query i if i - window < j <= i, as
transformers' sliding_window_overlay); the KV cache keeps every slot and the mask hides the old ones.
RoPE uses the rotate-half layout of Hugging Face's Llama, so q/k weights load without a permute
(the permute pitfall of llama2.c-style interleaved RoPE). References: Touvron et al. 2023 (Llama),
Jiang et al. 2023 (Mistral), Gemma Team 2024 and 2025 (Gemma 2, Gemma 3), Qwen Team 2025 (Qwen3), and the
structure of nanoGPT / gpt-fast / litgpt.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3")
GEMMAS = ("gemma", "gemma2", "gemma3_text")
# transformers' defaults (configuration_<family>.py) for fields a config.json may leave out, where they differ from ours
DEFAULTS = {
    "mistral": dict(sliding_window=4096),
    "qwen3": dict(head_dim=128),
    "gemma": dict(head_dim=256),
    "gemma2": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
}
# a gemma3 checkpoint's text_config lists only what differs from Gemma3TextConfig: the sizes it leaves out
GEMMA3_TEXT_SIZES = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=131_072)
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu,  # transformers' "gelu" is the exact one (ACT2FN)
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    sliding_window: int | None = None
    layer_types: tuple | None = None  # per layer, one of LAYER_TYPES; None: every layer slides when sliding_window is set
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' own RoPE base (None: the global one)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    act: str = "silu"
    gemma: bool = False  # (1 + w) RMSNorm and sqrt(dim) embedding scale
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE
    sandwich_norm: bool = False  # Gemma 2/3: attention and MLP outputs normed too, before the residual add
    attn_scale: float | None = None  # Gemma 2/3: query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None  # Gemma 2 (and 3, where set): the same on the logits
    hf: dict = field(default_factory=dict, repr=False)  # the config.json we came from, saved back as is

    def sliding(self, i) -> bool:
        """Whether layer i sees only the last sliding_window tokens."""
        return self.sliding_window is not None and (self.layer_types is None or self.layer_types[i] == "sliding_attention")

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config.json dict; unsupported settings are errors, not silent differences."""
        if not isinstance(hf, dict):
            raise ValueError(f"{where}: not a JSON object")
        mt = hf.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})")
        if mt == "gemma3":  # a vision-language checkpoint: we read its text tower, and save that as gemma3_text
            hf, mt, where = _gemma3_text_config(hf, where), "gemma3_text", f"{where}: text_config"
        d = {**DEFAULTS.get(mt, {}), **hf}
        get = lambda name, kind=int, default=REQUIRED, null=False: _field(d, name, kind, default, where, null)  # noqa: E731
        n_heads, dim = get("num_attention_heads"), get("hidden_size")
        cfg = cls(vocab_size=get("vocab_size"), dim=dim, n_layers=get("num_hidden_layers"), n_heads=n_heads,
                  n_kv_heads=get("num_key_value_heads", int, n_heads, null=True),
                  head_dim=get("head_dim", int, dim // n_heads, null=True),
                  intermediate_size=get("intermediate_size"), norm_eps=get("rms_norm_eps", float, 1e-6),
                  max_seq_len=get("max_position_embeddings", int, 4096),
                  tie_embeddings=get("tie_word_embeddings", bool, mt in GEMMAS), gemma=mt in GEMMAS, hf=hf)
        if n_heads % cfg.n_kv_heads:
            raise ValueError(f"{where}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {cfg.n_kv_heads}")
        # transformers >= 5 writes rope_parameters (with rope_theta inside); older files rope_scaling + rope_theta.
        # Gemma 3: one object per layer type in rope_parameters, or rope_theta / rope_local_base_freq / rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        per_type = mt == "gemma3_text" and isinstance(rope, dict) and set(rope) & set(LAYER_TYPES)
        cfg.rope_theta, cfg.rope_scaling = _rope((rope.get("full_attention") or {}) if per_type else rope,
                                                 get("rope_theta", float, 10000.0), where)
        if mt == "gemma3_text":
            local = (rope.get("sliding_attention") or {}) if per_type else {}
            cfg.local_rope_theta, scaling = _rope(local, get("rope_local_base_freq", float), where)
            if scaling:
                raise ValueError(f"{where}: rope scaling of the sliding-window layers is not supported")
        cfg.act = get("hidden_activation", str, None, null=True) or get("hidden_act", str, "silu")
        if mt == "gemma" and cfg.act == "gelu":  # HF Gemma uses the tanh approximation whatever "gelu" says
            cfg.act = "gelu_pytorch_tanh"
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {cfg.act!r} is not supported ({', '.join(ACTIVATIONS)})")
        bias = get("attention_bias", bool, False)
        cfg.qkv_bias, cfg.o_bias = bias or mt == "qwen2", bias
        cfg.mlp_bias = get("mlp_bias", bool, False)
        cfg.qk_norm, cfg.sandwich_norm = mt in ("qwen3", "gemma3_text"), mt in ("gemma2", "gemma3_text")
        if mt in ("gemma2", "gemma3_text"):
            cfg.attn_scale = get("query_pre_attn_scalar", float) ** -0.5
            # transformers' Gemma3Attention reads attn_logit_softcapping but never applies it: so neither do we
            cfg.attn_softcap = get("attn_logit_softcapping", float, None, null=True) if mt == "gemma2" else None
            cfg.final_softcap = get("final_logit_softcapping", float, None, null=True)
            if get("use_bidirectional_attention", bool, False, null=True):
                raise ValueError(f"{where}: use_bidirectional_attention (an encoder) is not supported")
        _sliding(cfg, mt, d, get, where)
        return cfg


def _sliding(cfg, mt, d, get, where):
    """sliding_window and layer_types as transformers reads them: Mistral slides in every layer; Qwen2/3 with
    use_sliding_window from layer max_window_layers on; Gemma 2 every other layer, Gemma 3 five of each six
    (sliding_window_pattern); a layer_types list in config.json decides where there is one."""
    n, pattern = cfg.n_layers, None
    if mt == "mistral":
        cfg.sliding_window = get("sliding_window", int, None, null=True)
        return
    if mt in ("qwen2", "qwen3") and get("use_sliding_window", bool, False, null=True):
        first = d.get("max_window_layers", 28)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ValueError(f"{where}: field 'max_window_layers' must be a non-negative integer, got {first!r}")
        cfg.sliding_window, pattern = get("sliding_window", int, None, null=True), [i >= first for i in range(n)]
    elif mt in ("gemma2", "gemma3_text"):
        every = 2 if mt == "gemma2" else get("sliding_window_pattern", int, 6)
        cfg.sliding_window, pattern = get("sliding_window", int, None, null=True), [(i + 1) % every != 0 for i in range(n)]
    types = d.get("layer_types")
    if types is None:
        types = [LAYER_TYPES[s] for s in pattern or [False] * n]
    if not isinstance(types, list) or len(types) != n or not all(t in LAYER_TYPES for t in types):
        raise ValueError(f"{where}: layer_types must list {n} entries (num_hidden_layers), each one of {', '.join(LAYER_TYPES)}")
    if "sliding_attention" in types and (cfg.sliding_window is None or pattern is None):
        raise ValueError(f"{where}: layer_types has sliding_attention layers but no sliding window is set "
                         f"(sliding_window{', use_sliding_window' if mt.startswith('qwen') else ''})")
    cfg.layer_types = tuple(types)


def _rope(rope, theta, where):
    """(rope_theta, rope_scaling or None) of one rope_parameters / rope_scaling object; theta is the default."""
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: rope_scaling must be an object, got {rope!r}")
    theta = _field(rope, "rope_theta", float, theta, where)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (default, linear, llama3)")
    for name in {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}.get(kind, []):
        _field(rope, name, float, REQUIRED, f"{where}: rope_scaling")
    if kind == "llama3":
        _field(rope, "original_max_position_embeddings", int, REQUIRED, f"{where}: rope_scaling")
    return theta, None if kind == "default" else {**rope, "rope_type": kind}


def _gemma3_text_config(hf, where):
    """The text_config of a gemma3 (vision-language) config.json, complete, as the gemma3_text config we save."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{where}: a gemma3 config needs a text_config object")
    ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    return {**GEMMA3_TEXT_SIZES, "tie_word_embeddings": hf.get("tie_word_embeddings", True),
            **ids, **text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


REQUIRED = object()


def _field(d, name, kind, default, where, null=False):
    """d[name] checked: an int or float must be positive, a bool a bool, a str a str. Absent is the default, and
    so is null where transformers reads null so (null=True: num_key_value_heads, head_dim, ...); else an error."""
    v = d.get(name)
    if name in d and v is None and not null:
        raise ValueError(f"{where}: field {name!r} is null")
    if v is None:
        if default is REQUIRED:
            raise ValueError(f"{where}: missing field {name!r}")
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)) or (kind in (int, float) and not v > 0):
        want = {int: "a positive integer", float: "a positive number", bool: "true or false", str: "a string"}[kind]
        raise ValueError(f"{where}: field {name!r} must be {want}, got {v!r}")
    return v


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset=0.0):
        super().__init__()
        self.eps, self.offset = eps, offset  # Gemma stores w - 1 and scales by (1 + w)
        self.weight = nn.Parameter(torch.ones(dim) - offset)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # normalise in fp32
        if self.offset:  # Gemma multiplies in fp32 before casting back
            return (h * (self.offset + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies (2, head_dim / 2): row 0 for the global layers, with the linear or Llama-3.1 ("llama3")
    scaling applied; row 1 for the sliding-window layers (Gemma 3's local base, unscaled; else row 0 again)."""
    rows = [_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)]
    rows.append(rows[0] if cfg.local_rope_theta is None else _inv_freq(cfg.head_dim, cfg.local_rope_theta, None, device))
    return torch.stack(rows)


def _inv_freq(hd, theta, s, device):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float64) / hd)
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":  # smooth interpolation between low and high frequencies
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where((wavelen >= old / hi) & (wavelen <= old / lo), mid, scaled)
    return inv.float()


def apply_rope(x, cos, sin):
    # x: (B, n_head, T, head_dim); cos/sin: (B, 1, T, head_dim), rotate-half layout
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: (T,) cache slots; k, v: (B, n_kv, T, hd)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


def attention_mask(q_slots, k_slots, window=None, key_mask=None):
    """Which keys each query sees (True = visible): slot j <= slot i, within the window (i - window < j, as
    transformers' sliding_window_overlay) and not padding. (T, L) without key_mask, else (B, 1, T, L)."""
    m = k_slots[None, :] <= q_slots[:, None]  # (T, L) causal
    if window is not None:
        m = m & (k_slots[None, :] > q_slots[:, None] - window)
    if key_mask is None:
        return m
    m = m[None] & key_mask[:, None, :]  # (B, T, L)
    return (m | (k_slots[None, :] == q_slots[:, None])[None])[:, None]  # a pad query sees itself: no NaN


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # Qwen3 (w x) and Gemma 3 ((1 + w) x), over head_dim
            self.q_norm = RMSNorm(hd, cfg.norm_eps, 1.0 if cfg.gemma else 0.0)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, 1.0 if cfg.gemma else 0.0)
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap  # None: SDPA's 1/sqrt(head_dim); no capping
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, L, hd)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if self.softcap is None:
            # GQA: each K/V head serves n_heads / n_kv_heads query heads. enable_gqa lets the kernel share them;
            # materialising the repeated K/V (llama-style repeat_kv) cost 20x more per decode step on a CPU.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:  # Gemma 2 caps the scores before the softmax, which SDPA cannot: transformers' eager attention
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, L, hd)
            att = (q @ k.transpose(-2, -1)) * (self.scale or self.head_dim ** -0.5)  # (B, nh, T, L)
            att = self.softcap * torch.tanh(att / self.softcap)
            att = att.masked_fill(~mask, float("-inf"))  # the caller always gives this path a mask
            y = torch.softmax(att.float(), dim=-1).to(q.dtype) @ v  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh * hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU / GeGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        off = 1.0 if cfg.gemma else 0.0
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, off)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, off)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:  # Gemma 2/3: post_attention_layernorm norms the attention output; these the MLP's
            self.pre_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, off)

    def forward(self, x, cos, sin, mask, input_pos):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # the "model." prefix of the checkpoint keys
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, 1.0 if cfg.gemma else 0.0)


class LMHead(nn.Linear):
    """The output projection, with Gemma 2's final soft-capping (cap * tanh(logits / cap)) when it has one: every
    caller of `model.lm_head(h)` (the methods' losses, generation) gets the capped logits transformers gives."""

    def __init__(self, dim, vocab_size, softcap=None):
        super().__init__(dim, vocab_size, bias=False)
        self.softcap = softcap

    def forward(self, x):
        y = super().forward(x)
        return y if self.softcap is None else self.softcap * torch.tanh(y / self.softcap)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = LMHead(cfg.dim, cfg.vocab_size, cfg.final_softcap)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)  # (2, hd/2): global, sliding layers
        self.sliding = [cfg.sliding(i) for i in range(cfg.n_layers)]
        self.grad_checkpointing = False  # activation checkpointing per block (train.py --grad-ckpt)

    def compile_blocks(self, **kw):
        """torch.compile each decoder block in place (regional compilation): the blocks are identical (sliding and
        global layers differ only in the mask they are given), so one compiled graph serves all of them and start-up
        takes seconds instead of minutes; parameter names do not change (no `_orig_mod.` in anything saved)."""
        for layer in self.model.layers:
            layer.compile(**kw)
        return self

    def forward(self, idx, positions=None, input_pos=None, key_mask=None, return_hidden=False):
        """Logits (B, T, vocab) for token ids idx (B, T).

        Training: right-padded batches, plain causal attention. Generation (after `setup_cache`):
        `input_pos` (T,) are the cache slots being written, `positions` (B, T) the RoPE positions of
        each row (they differ with left padding) and `key_mask` (B, L) marks the real (non-pad) slots.
        return_hidden=True returns the final normed hidden states (B, T, dim) instead of logits.
        """
        B, T = idx.shape
        cfg = self.config
        if positions is None:
            start = 0 if input_pos is None else input_pos[0]
            positions = (start + torch.arange(T, device=idx.device)).expand(B, T)
        freqs = positions[..., None].float() * self.inv_freq[:, None, None, :]  # (2, B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (2, B, 1, T, hd): global, sliding layers
        x = self.model.embed_tokens(idx)
        if cfg.gemma:  # HF rounds the scale to the activation dtype first
            x = x * torch.tensor(cfg.dim ** 0.5, dtype=x.dtype)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        sw = cfg.sliding_window
        if input_pos is None:  # training: plain causal (SDPA's is_causal) unless a window or a score cap needs a mask
            slots = torch.arange(T, device=idx.device)
            full = attention_mask(slots, slots) if cfg.attn_softcap is not None else None
            local = attention_mask(slots, slots, sw) if sw is not None and T > sw else full
        else:  # generation: cache slot j visible to query i if j <= slot(i), within the window, and not padding
            slots = torch.arange(self.model.layers[0].self_attn.kv_cache.k.shape[2], device=idx.device)
            full = attention_mask(input_pos, slots, None, key_mask)
            local = attention_mask(input_pos, slots, sw, key_mask) if sw is not None else full
        for layer, s in zip(self.model.layers, self.sliding):
            args = (x, cos[int(s)], sin[int(s)], local if s else full, input_pos)
            if self.grad_checkpointing and torch.is_grad_enabled():  # keep block inputs only; recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def setup_cache(self, batch, max_len, dtype=None):
        """Give every attention layer a KV cache; caches kept by clear_cache(keep=True) are reused when
        their shape matches (a compiled decode step then sees the same buffers: no recompilation)."""
        cfg, p = self.config, self.lm_head.weight
        kept = getattr(self, "_kept_caches", None)
        shape, dtype = (batch, cfg.n_kv_heads, max_len, cfg.head_dim), dtype or p.dtype
        if not (kept and kept[0].k.shape == shape and kept[0].k.dtype == dtype and kept[0].k.device == p.device):
            kept = [KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, p.device) for _ in self.model.layers]
        for layer, cache in zip(self.model.layers, kept):
            layer.self_attn.kv_cache = cache
        self._kept_caches = None

    def clear_cache(self, keep=False):
        """Detach the caches (training runs without them); keep=True holds them for the next setup_cache."""
        self._kept_caches = [layer.self_attn.kv_cache for layer in self.model.layers] if keep else None
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    # ---- Hugging Face checkpoints -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Transformer":
        """Load config.json + model.safetensors (or the shards of model.safetensors.index.json).

        Builds on the meta device and assigns the checked tensors (gpt-fast, torchtune); every key and
        shape must match. dtype None keeps the checkpoint's dtype. Never unpickles anything.
        """
        path = Path(path)
        hf = read_json(path / "config.json")
        cfg = ModelConfig.from_hf(hf, str(path / "config.json"))
        with torch.device("meta"):
            model = cls(cfg)
        expected = model.state_dict()
        if cfg.tie_embeddings:
            expected.pop("lm_head.weight")
        sd = load_safetensors(path)
        if isinstance(hf, dict) and hf.get("model_type") == "gemma3":
            sd = gemma3_text_tower(sd)
        for k in list(sd):
            if k.endswith("rotary_emb.inv_freq"):  # old Llama checkpoints store this buffer; we recompute it
                del sd[k]
            elif cfg.tie_embeddings and k == "lm_head.weight":
                del sd[k]  # some tied checkpoints repeat it
        unknown, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
        if unknown or missing:
            what = f"unknown tensor {unknown[0]!r}" if unknown else f"missing tensor {missing[0]!r}"
            raise ValueError(f"{path}: {what} ({len(unknown)} unknown, {len(missing)} missing)")
        for k, t in sd.items():
            if t.shape != expected[k].shape:
                raise ValueError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, config.json implies {tuple(expected[k].shape)}")
            if not t.is_floating_point():  # an integer or bool weight is not a model's: casting it would hide that
                raise ValueError(f"{path}: tensor {k!r} is {str(t.dtype).removeprefix('torch.')}, not floating point")
            sd[k] = t.to(device=device, dtype=dtype or t.dtype)
        model.load_state_dict(sd, strict=False, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_frequencies(cfg, device=device)
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes=2 * 1024**3, tokenizer_from=None):
        """Write config.json + safetensors (sharded above max_shard_bytes) in the Hugging Face layout.

        LoRA tensors are left out (merge first to keep them; lora.save_adapter writes them alone).
        Each file is written to a temporary name and renamed, the index and config last.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items() if "lora_" not in k}
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight")
        shards, size = [{}], 0
        for k, v in sd.items():
            n = v.numel() * v.element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k], size = v, size + n
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_tensors(shard, path / name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            write_json(path / "model.safetensors.index.json", index)
        dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        write_json(path / "config.json", {**self.config.hf, "torch_dtype": dtype})
        if tokenizer_from is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
                if (Path(tokenizer_from) / name).exists():
                    atomic_write(path / name, (Path(tokenizer_from) / name).read_bytes())


# A gemma3 checkpoint's text tower under transformers' current and older names; its vision tower stays unread
GEMMA3_NAMES = {"model.language_model.": "model.", "language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                "lm_head.": "lm_head.", "model.vision_tower.": None, "vision_tower.": None,
                "model.multi_modal_projector.": None, "multi_modal_projector.": None}


def gemma3_text_tower(sd: dict) -> dict:
    """The tensors of a gemma3 (vision-language) checkpoint renamed as Gemma3ForCausalLM's; an unknown name is kept
    as it is (the loader then names it)."""
    out = {}
    for k, t in sd.items():
        prefix = next((p for p in GEMMA3_NAMES if k.startswith(p)), None)
        if prefix is None:
            out[k] = t
        elif GEMMA3_NAMES[prefix] is not None:
            out[GEMMA3_NAMES[prefix] + k[len(prefix):]] = t
    return out


def read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def atomic_write(path, data: bytes):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:  # no stray temporary file: the old file, if any, is left as it was
        tmp.unlink(missing_ok=True)
        raise


def save_tensors(tensors, path, metadata=None):
    """A safetensors file written atomically (a temporary name, then renamed; removed on failure), with the
    user's umask: safetensors itself writes mode 0600, which colleagues on a shared cluster cannot read."""
    from safetensors.torch import save_file
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def load_safetensors(path: Path) -> dict:
    """All tensors of a checkpoint directory: model.safetensors or the shards named in the index."""
    from safetensors import safe_open
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map") if isinstance(read_json(index), dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' object of tensor name -> file name")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    sd = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path / name}: not found (listed in the index)") from None
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise ValueError(f"{path / name}: cannot read safetensors file ({e})") from None
    return sd
