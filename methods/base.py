"""What a continual-learning method is here: a few hooks around train.py's loop (mammoth's shape).

train.py owns the data order, backward, gradient accumulation, autocast, the optimizer and the
schedule; a method only says what loss to minimise and, if it must, how to touch the gradients.

    begin_task(model, task, memory)   once per user task, before its first step
    data(task, memory)                the examples to train on (replay mixes memory in here)
    loss(model, batch) -> Tensor      the loss of one micro-batch
    after_backward(model)             after the step's gradients are complete (A-GEM projects here)
    end_task(model)                   after the task's last step

`model` is the aligned model with a fresh LoRA; `lora.disabled(model)` runs theta_safe, the aligned
model itself. `memory` is the safety memory M: tokenized harmful prompts with refusals (plus benign
prompts with helpful answers). A batch is a dict: idx (B, T), labels (B, T) with -100 outside the
responses, and norm, the number of target tokens in the whole optimizer step (so that gradient
accumulation averages over tokens, not micro-batches) and frac, this micro-batch's share of the step.
"""
import random

import torch
import torch.nn.functional as F


class Method:
    name = "base"

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

    def sample_memory(self, size):
        """A random batch (list of examples) of the safety memory."""
        return self.rng.sample(self.memory, min(size, len(self.memory)))


def nll(model, batch):
    """Summed next-token NLL over the target tokens, divided by batch["norm"] (the step's target tokens).

    Logits are computed only where there is a target: the vocabulary projection is the costliest
    matmul of a small model, and most tokens of a chat example are prompt.
    """
    mask = batch["labels"][:, 1:] != -100  # position t predicts token t+1
    h = model(batch["idx"], return_hidden=True)[:, :-1][mask]  # (N, dim)
    logits = model.lm_head(h).float()  # (N, vocab)
    return F.cross_entropy(logits, batch["labels"][:, 1:][mask], reduction="sum") / batch["norm"]


def collate(examples, pad_id=0, norm=None, frac=1.0, device=None):
    """Right-pad (ids, labels) pairs into a batch dict; norm defaults to this batch's target tokens."""
    T = max(len(e["ids"]) for e in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        idx[i, : len(e["ids"])] = torch.tensor(e["ids"])
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    n = int((labels[:, 1:] != -100).sum())
    return dict(idx=idx.to(device), labels=labels.to(device), norm=norm or max(n, 1), frac=frac)


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
