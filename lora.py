"""Hand-written LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

y = W x + (alpha / r) * B A dropout(x), with A (r, in) kaiming-uniform and B (out, r) zero, so a fresh
adapter changes nothing. `LoRALinear` keeps the frozen `weight` (and `bias`) of the layer it replaces,
so checkpoint keys do not change (torchtune). The model with its adapters disabled is the model it
was loaded as: for us, theta_safe, the aligned model the user starts from -- a free teacher for
DER, LwF and EWC without a second copy of the weights.

Adapters are saved in PEFT's layout (adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight`), so Hugging Face PEFT and inference servers load them.
"""
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import read_json, save_tensors, write_json
from model import linear as base_linear

PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # same Parameters: keys stay q_proj.weight
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = linear.weight
        # adapters stay fp32 even on bf16 frozen weights: the optimizer updates them, and they are small
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's init, as PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    def delta(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (out, in)

    def forward(self, x):
        y = base_linear(x, self.weight, self.bias)  # the frozen product, as model.Linear's
        if self.merged:  # the delta is inside weight; take it out again if asked to run disabled
            return y - F.linear(x, self.delta().to(x.dtype)) if self.disabled else y
        if self.disabled:
            return y
        a = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # bf16 weights without autocast: the fp32 adapter's dtype
            a = a.to(self.lora_A.weight.dtype)  # (under autocast lora_A casts to bf16 anyway: a cast there is a round trip)
        return y + (self.lora_B(self.lora_A(a)) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, rank=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj")) -> nn.Module:
    """Replace every nn.Linear whose name ends with one of `targets` by a LoRALinear, in place.

    Afterwards only the LoRA parameters are trainable.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    found = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha, dropout))
            found.append(name)
    model.train(model.training)  # the new layers (their dropout) in the model's mode: eval stays eval
    if not found:
        raise ValueError(f"--lora-targets {','.join(targets)}: no linear layer of the model has that name")
    model.lora_config = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(set(targets)))
    return model


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model):
    return [p for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def merge(model):
    for _, m in lora_layers(model):
        m.merge()


def unmerge(model):
    for _, m in lora_layers(model):
        m.unmerge()


@contextmanager
def disabled(model):
    """Run the model as it was before the adapters (theta_safe): `with lora.disabled(model): ...`."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


@contextmanager
def merged(model):
    """The adapters folded into the frozen weights for a while (generation then runs one matmul per layer instead of
    three and no casts: the evaluation 1.5x faster on a CPU in bf16), and the exact weights put back afterwards, from a
    copy of the adapted layers' weights (merging and unmerging in bf16 would not give them back)."""
    layers = [m for _, m in lora_layers(model) if not m.merged and not m.disabled]
    saved = [m.weight.detach().clone() for m in layers]
    for m in layers:
        m.merge()
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.weight.copy_(w)
                m.merged = False


def adapter_state(model) -> dict:
    """The adapter tensors under PEFT's key names (whole: an FSDP-sharded weight is gathered, by every process)."""
    full = lambda w: w.full_tensor() if hasattr(w, "full_tensor") else w
    return {f"{PEFT_PREFIX}{n}.{ab}.weight": full(getattr(m, ab).weight.detach()).contiguous()
            for n, m in lora_layers(model) for ab in ("lora_A", "lora_B")}


def save_adapter(model, path, base_model_name_or_path=None, state=None):
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout (atomically); state: adapter_state(model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(state if state is not None else adapter_state(model), path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                  bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  use_rslora=False, use_dora=False, modules_to_save=None, **model.lora_config)
    write_json(path / "adapter_config.json", config)


def load_adapter(model, path):
    """Apply LoRA as adapter_config.json says and load its weights (ours or PEFT's)."""
    from safetensors.torch import load_file
    path = Path(path)
    where = path / "adapter_config.json"
    cfg = read_json(where)
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError(f"{where}: only plain LoRA adapters are supported")
    for k in ("alpha_pattern", "rank_pattern"):  # per-layer ranks or scales: ignoring them would change the model
        if cfg.get(k):
            raise ValueError(f"{where}: {k} (per-layer LoRA settings) is not supported")
    for k, kind in (("r", int), ("lora_alpha", (int, float)), ("target_modules", (str, list))):
        if not isinstance(cfg.get(k), kind) or isinstance(cfg.get(k), bool) or (k == "r" and cfg[k] <= 0):
            raise ValueError(f"{where}: field {k!r} is missing or not a valid {'positive integer' if k == 'r' else 'value'}")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}: target_modules must be module names, got {targets!r}")
    dropout = cfg.get("lora_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1), got {cfg['lora_dropout']!r}")
    if not lora_layers(model):
        try:
            apply_lora(model, cfg["r"], cfg["lora_alpha"], dropout, tuple(targets))
        except ValueError:
            raise ValueError(f"{where}: target_modules {targets}: no linear layer of the model has that name") from None
    f = path / "adapter_model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f}: not found")
    try:
        sd = load_file(str(f))
    except Exception as e:
        raise ValueError(f"{f}: cannot read safetensors file ({e})") from None
    sd = {k.replace(".default.weight", ".weight"): v for k, v in sd.items()}  # PEFT keeps names unsuffixed; tolerate both
    expected = adapter_state(model)
    if set(sd) != set(expected):
        bad = sorted(set(sd) ^ set(expected))[0]
        raise ValueError(f"{f}: adapter tensor {bad!r} does not match the model's LoRA layers")
    with torch.no_grad():
        for n, m in lora_layers(model):
            for ab in ("lora_A", "lora_B"):
                t = sd[f"{PEFT_PREFIX}{n}.{ab}.weight"]
                w = getattr(m, ab).weight
                if t.shape != w.shape:
                    raise ValueError(f"{f}: {n}.{ab} has shape {tuple(t.shape)}, expected {tuple(w.shape)}")
                w.copy_(t)
    return model
