"""What a continual-learning method is here: a few hooks around train.py's loop (mammoth's shape).

train.py owns the data order, backward, gradient accumulation, autocast, the optimizer and the
schedule; a method only says what loss to minimise and, if it must, how to touch the gradients.

    begin_task(model, task, memory)   once per user task, before its first step
    data(task, memory)                the examples to train on (replay mixes memory in here)
    loss(model, batch) -> Tensor      the loss of one micro-batch
    after_backward(model)             after the step's gradients are complete (A-GEM projects here)
    end_task(model)                   after the task's last step
    state_dict() / load_state_dict()  the method's state in a checkpoint (default: self.rng's)

`model` is the aligned model with a fresh LoRA; `lora.disabled(model)` runs theta_safe, the aligned
model itself. `memory` is the safety memory M: tokenized harmful prompts with refusals (plus benign
prompts with helpful answers). A batch is a dict: idx (B, T), labels (B, T) with -100 outside the
responses, and norm, the number of target tokens in the whole optimizer step (so that gradient
accumulation averages over tokens, not micro-batches) and frac, this micro-batch's share of the step.
"""
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from model import load_safetensors


class Method:
    name = "base"
    changes_base_weights = False  # True: end_task edits the frozen weights (MagMax); train.py then saves a merged checkpoint

    @staticmethod
    def add_args(parser):
        pass

    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)

    def begin_task(self, model, task, memory):
        self.memory = memory

    def data(self, task, memory):
        return list(task)

    def loss(self, model, batch):
        return nll(model, batch)

    def after_backward(self, model):
        pass

    def end_task(self, model):
        pass

    def state_dict(self) -> dict:
        """What a resumed run needs to go on exactly as an uninterrupted one (train.py's checkpoints).

        Values are tensors or JSON. The default is self.rng's state; a method whose state lives beyond
        one task extends both functions. What begin_task and data build is not saved: on --resume they
        run again from the state saved as the task began (DER recomputes its top-k logits, EWC its Fisher).
        """
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict):
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def sample_memory(self, size):
        """A random batch (list of examples) of the safety memory."""
        return self.rng.sample(self.memory, min(size, len(self.memory)))


def nll(model, batch):
    """Summed next-token NLL over the target tokens, divided by batch["norm"] (the step's target tokens).

    Logits are computed only where there is a target: the vocabulary projection is the costliest
    matmul of a small model, and most tokens of a chat example are prompt.
    """
    h = at_targets(model(batch["idx"], return_hidden=True), batch)  # (N, dim)
    logits = model.lm_head(h).float()  # (N, vocab)
    return F.cross_entropy(logits, batch["tgt"], reduction="sum") / batch["norm"]


def at_targets(x, batch):
    """The rows of x (B, T, ...) at the positions that predict a target token: (N, ...).

    Position t predicts token t+1. The positions were found on the host by collate, so selecting them
    does not wait for the device (boolean-mask indexing would: its output size is data-dependent).
    """
    return x[:, :-1].flatten(0, 1).index_select(0, batch["tgt_pos"])


def collate(examples, pad_id=0, norm=None, frac=1.0, device=None):
    """Right-pad (ids, labels) pairs into a batch dict; norm defaults to this batch's target tokens."""
    T = max(len(e["ids"]) for e in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        idx[i, : len(e["ids"])] = torch.tensor(e["ids"])
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    tgt_pos = (labels[:, 1:] != -100).flatten().nonzero().squeeze(1)  # flat positions into (B, T-1)
    tgt = labels[:, 1:].flatten()[tgt_pos]
    return dict(idx=idx.to(device), labels=labels.to(device), tgt_pos=tgt_pos.to(device), tgt=tgt.to(device),
                norm=norm or max(len(tgt), 1), frac=frac)


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def add_base_model_arg(parser):
    parser.add_argument("--base-model", help="the unaligned checkpoint the aligned model was trained from "
                        "(default: the default experiment's; required with --model)")


def base_model_dir(args) -> Path:
    """theta_base, the checkpoint the aligned model came from (MagMax, SafeLoRA): --base-model, or the default
    experiment's unaligned SmolLM2 when --model is not given."""
    if getattr(args, "base_model", None):
        path = Path(args.base_model)
    elif getattr(args, "model", None):
        raise ValueError("--base-model DIR is required with --model: the unaligned checkpoint your aligned model was trained from")
    else:
        import align  # here, not at the top: align imports the methods
        path = align.ROOT / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--base-model {path}: no config.json there")
    return path


def base_weights(model, path) -> dict:
    """theta_base's tensors (on the CPU) for every non-LoRA parameter of `model`, by name; shapes must match."""
    sd = load_safetensors(Path(path))
    out = {}
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as model.embed_tokens.weight
        if "lora_" in name:
            continue
        if name not in sd:
            raise ValueError(f"--base-model {path}: no tensor {name!r}; is it the model the aligned one came from?")
        if sd[name].shape != p.shape:
            raise ValueError(f"--base-model {path}: {name} has shape {tuple(sd[name].shape)}, the model {tuple(p.shape)}")
        out[name] = sd[name]
    return out
