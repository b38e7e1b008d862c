"""A Llama-style decoder for the families our users bring, loaded from Hugging Face safetensors.

One `Transformer` covers Llama 2/3.x (incl. the "llama3" RoPE scaling of 3.1/3.2), Mistral, Qwen2/2.5
(q/k/v bias), Gemma 1 (GeGLU, (1+w) RMSNorm, sqrt(d) embedding scale, free head_dim) and SmolLM,
with GQA/MQA and tied or untied embeddings. Module names mirror the Hugging Face checkpoint keys
(`model.layers.0.self_attn.q_proj.weight`), so loading is a checked one-to-one copy, no renaming.

RoPE uses the rotate-half layout of Hugging Face's Llama, so q/k weights load without a permute
(the permute pitfall of llama2.c-style interleaved RoPE). References: Touvron et al. 2023 (Llama),
Jiang et al. 2023 (Mistral), Gemma Team 2024, and the structure of nanoGPT / gpt-fast / litgpt.
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

SUPPORTED = ("llama", "mistral", "qwen2", "gemma")
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
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    act: str = "silu"
    gemma: bool = False  # (1 + w) RMSNorm and sqrt(dim) embedding scale
    hf: dict = field(default_factory=dict, repr=False)  # the config.json we came from, saved back as is

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config.json dict; unsupported settings are errors, not silent differences."""
        if not isinstance(hf, dict):
            raise ValueError(f"{where}: not a JSON object")
        mt = hf.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})")
        get = lambda name, kind=int, default=REQUIRED, null=False: _field(hf, name, kind, default, where, null)  # noqa: E731
        n_heads, dim = get("num_attention_heads"), get("hidden_size")
        cfg = cls(vocab_size=get("vocab_size"), dim=dim, n_layers=get("num_hidden_layers"), n_heads=n_heads,
                  n_kv_heads=get("num_key_value_heads", int, n_heads, null=True),
                  head_dim=get("head_dim", int, dim // n_heads, null=True),
                  intermediate_size=get("intermediate_size"), norm_eps=get("rms_norm_eps", float, 1e-6),
                  max_seq_len=get("max_position_embeddings", int, 4096),
                  tie_embeddings=get("tie_word_embeddings", bool, mt == "gemma"), gemma=mt == "gemma", hf=hf)
        if n_heads % cfg.n_kv_heads:
            raise ValueError(f"{where}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {cfg.n_kv_heads}")
        # transformers >= 5 writes rope_parameters (with rope_theta inside); older files rope_scaling + rope_theta
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{where}: rope_scaling must be an object, got {rope!r}")
        cfg.rope_theta = _field(rope, "rope_theta", float, get("rope_theta", float, 10000.0), where)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (default, linear, llama3)")
        for name in {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}.get(kind, []):
            _field(rope, name, float, REQUIRED, f"{where}: rope_scaling")
        if kind == "llama3":
            _field(rope, "original_max_position_embeddings", int, REQUIRED, f"{where}: rope_scaling")
        cfg.rope_scaling = None if kind == "default" else {**rope, "rope_type": kind}
        cfg.act = get("hidden_activation", str, None, null=True) or get("hidden_act", str, "silu")
        if mt == "gemma" and cfg.act == "gelu":  # HF Gemma uses the tanh approximation whatever "gelu" says
            cfg.act = "gelu_pytorch_tanh"
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {cfg.act!r} is not supported ({', '.join(ACTIVATIONS)})")
        bias = get("attention_bias", bool, False)
        cfg.qkv_bias, cfg.o_bias = bias or mt == "qwen2", bias
        cfg.mlp_bias = get("mlp_bias", bool, False)
        if mt == "mistral" or (mt == "qwen2" and get("use_sliding_window", bool, False)):
            cfg.sliding_window = get("sliding_window", int, None, null=True)
        return cfg


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
    """Inverse frequencies, with the linear or Llama-3.1 ("llama3") scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float64) / hd)
    s = cfg.rope_scaling
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, L, hd)
        # GQA: each K/V head serves n_heads / n_kv_heads query heads. enable_gqa lets the kernel share them;
        # materialising the repeated K/V (llama-style repeat_kv) cost 20x more per decode step on a CPU.
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
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

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # the "model." prefix of the checkpoint keys
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, 1.0 if cfg.gemma else 0.0)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.grad_checkpointing = False  # activation checkpointing per block (train.py --grad-ckpt)

    def compile_blocks(self, **kw):
        """torch.compile each decoder block in place (regional compilation): the blocks are identical, so
        one compiled graph serves all of them and start-up takes seconds instead of minutes; parameter
        names do not change (no `_orig_mod.` in anything saved)."""
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
        sw = self.config.sliding_window
        if sw is not None and (T if input_pos is None else int(input_pos[-1]) + 1) > sw:
            raise ValueError(f"sequence longer than the sliding window ({sw}); sliding-window attention is not supported")
        if positions is None:
            start = 0 if input_pos is None else input_pos[0]
            positions = (start + torch.arange(T, device=idx.device)).expand(B, T)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        x = self.model.embed_tokens(idx)
        if self.config.gemma:  # HF rounds the scale to the activation dtype first
            x = x * torch.tensor(self.config.dim ** 0.5, dtype=x.dtype)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = None
        if input_pos is not None:  # cache slot j visible to query i if j <= slot(i) and j is not padding
            L = self.model.layers[0].self_attn.kv_cache.k.shape[2]
            slots = torch.arange(L, device=idx.device)
            mask = (slots[None, :] <= input_pos[:, None])[None] & key_mask[:, None, :]  # (B, T, L)
            mask = (mask | (slots[None, :] == input_pos[:, None])[None])[:, None]  # a pad query sees itself: no NaN
        for layer in self.model.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():  # keep block inputs only; recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos)
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
        cfg = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
        with torch.device("meta"):
            model = cls(cfg)
        expected = model.state_dict()
        if cfg.tie_embeddings:
            expected.pop("lm_head.weight")
        sd = load_safetensors(path)
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
