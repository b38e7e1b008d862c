"""ModelConfig: a Hugging Face config.json read into the fields model.py needs, every value checked.

One place for what each family's config.json means (model_type llama, mistral, qwen2, qwen3, gemma, gemma2,
gemma3_text, and the text tower of gemma3), the defaults transformers uses where a file leaves a field out
(configuration_<family>.py), and a one-line error naming config.json and the field for a bad or unsupported value.
"""
from dataclasses import dataclass, field

import torch.nn.functional as F

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
