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
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from config import ACTIVATIONS, ModelConfig
from files import atomic_write, load_safetensors, read_json, save_tensors, write_json


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


def linear(x, weight, bias=None):
    """F.linear, except for the 12-64 rows of an fp32 decoding step on a CPU, computed as (W @ x.T).T: the BLAS runs
    that form faster (a decode step's products, default model: 48 against 62 ms at 16 rows, 99 against 110 at 64;
    bench's 16 x 128 generation 10% faster) and, from 12 rows on, to the same bits as F.linear (every weight shape of
    the default model, 12-63 rows; 2026-12-06, Zen 5; below 12 both round by row count: see generate.MIN_ROWS)."""
    rows = x.shape[:-1].numel()
    if not (12 <= rows <= 64 and x.is_cpu and x.dtype == weight.dtype == torch.float32) or torch.is_grad_enabled() \
            or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    y = (weight @ x.reshape(rows, -1).t()).t().contiguous()
    return (y if bias is None else y + bias).view(*x.shape[:-1], -1)


class Linear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)


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


def _bf16_on_cpu(x):
    """Whether attention on CPU tensor x computes in bf16: x is bf16, or bf16 autocast is on (it casts SDPA's inputs)."""
    return x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


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

    def keep(self, rows, moved, filled):
        """Only batch rows `rows` go on (new row i is old row rows[i]); the `moved` rows change place, and of them only
        the first `filled` slots hold anything. The buffers shrink as views: nothing is allocated."""
        for name in ("k", "v"):
            buf = getattr(self, name)
            buf[moved, :, :filled] = buf[rows[moved], :, :filled]
            setattr(self, name, buf[: len(rows)])


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
        self.q_proj = Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)
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
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]  # the slots the key mask covers (generate)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if self.softcap is None and T == 1 and mask is not None:
            # a decode step: each K/V head's n_heads / n_kv_heads query heads, all at the same position, are the rows of
            # one query block (B, nkv, rep, hd) under one mask row. On a CPU the flash kernel runs a one-row query
            # badly: this is 5x faster in bf16 than enable_gqa (2026-12-03, Zen 5), and never slower in fp32.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, -1, self.head_dim), k, v, attn_mask=mask,
                                               scale=self.scale).view(B, self.n_heads, 1, self.head_dim)
        elif self.softcap is None and not (mask is None and q.is_cpu and torch.is_grad_enabled() and _bf16_on_cpu(q)):
            # GQA: each K/V head serves n_heads / n_kv_heads query heads. enable_gqa lets the kernel share them;
            # materialising the repeated K/V (llama-style repeat_kv) cost 20x more per decode step on a CPU.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            # explicit scores: Gemma 2 caps them before the softmax, which SDPA cannot (transformers' eager attention);
            # and a bf16 training step on a CPU, where SDPA's flash backward is slow: fwd+bwd of one layer (8 x 128,
            # 9 heads over 3) 21 ms there, 9 ms here (2026-12-03, Zen 5; in fp32, or without grad, SDPA is faster).
            # Each K/V head's query heads are the rows of one block (B, nkv, rep * T, hd): no repeated K/V.
            L, rep = k.shape[2], self.n_heads // self.n_kv_heads
            att = q.reshape(B, self.n_kv_heads, rep * T, self.head_dim) @ k.transpose(-2, -1)  # (B, nkv, rep * T, L)
            att = att.view(B, self.n_kv_heads, rep, T, L) * (self.scale or self.head_dim ** -0.5)
            if self.softcap is not None:
                att = self.softcap * torch.tanh(att / self.softcap)
            if mask is None:  # training: causal
                mask = torch.ones(T, L, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~(mask if mask.dim() == 2 else mask[:, :, None]), float("-inf"))
            att = torch.softmax(att, dim=-1)  # accumulated in fp32 for bf16 inputs too
            y = (att.view(B, self.n_kv_heads, rep * T, L) @ v).view(B, self.n_heads, T, self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh * hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)
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


class LMHead(Linear):
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
        each row (they differ with left padding) and `key_mask` (B, L) marks the real (non-pad) slots; attention
        reads the first L slots of the cache (all of it, or the filled ones: less work per step).
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
            slots = torch.arange(key_mask.shape[1], device=idx.device)  # the first slots: the cache's, or fewer
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

    def keep_cache_rows(self, rows, filled):
        """Shrink every cache to batch rows `rows` (new row i is old row rows[i]; the first `filled` slots): generation
        drops the rows that have stopped."""
        moved = (rows != torch.arange(len(rows), device=rows.device)).nonzero()[:, 0]
        for layer in self.model.layers:
            layer.self_attn.kv_cache.keep(rows, moved, filled)

    @contextmanager
    def cache_rows(self, start, end):
        """The KV caches cut to batch rows start:end for the forward passes inside: views, so what they write lands in
        the whole caches (generate prefills its prompts a group of similar lengths at a time)."""
        caches = [layer.self_attn.kv_cache for layer in self.model.layers]
        whole = [(c.k, c.v) for c in caches]
        for c, (k, v) in zip(caches, whole):
            c.k, c.v = k[start:end], v[start:end]
        try:
            yield
        finally:
            for c, (k, v) in zip(caches, whole):
                c.k, c.v = k, v

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
