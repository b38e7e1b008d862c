"""What a continual-learning method is here: a few hooks around the training loop (loop.py; mammoth's shape).

The loop owns the data order, backward, gradient accumulation, autocast, the optimizer and the
schedule; a method only says what to minimise and, if it must, how to touch the gradients.

    begin_task(model, task, memory)    once per user task, before its first step
    data(task, memory)                 the examples to train on (replay mixes memory in here)
    begin_step(model, step, batches, total, lr_scale)
                                       before optimizer step `step` (0-based) of the task's `total`; its
                                       micro-batches; lr_scale: this step's learning rate / the peak
    loss(model, batch) -> Tensor       the loss of one micro-batch of user data: a plain mean over its targets
    step_loss(model) -> Tensor | None  a term of the whole step (a penalty, a memory batch), or None
    after_backward(model)              after the step's gradients are complete, before the optimizer
    after_step(model)                  after the optimizer's step (A-GEM projects the update here)
    end_task(model)                    after the task's last step
    report() -> dict                   diagnostics for results.json (JSON values; default none)
    state_dict() / load_state_dict()   the method's state in a checkpoint (default: self.rng's)

Gradient accumulation is the loop's business (torchtune's recipes): it weights each micro-batch's
loss by the micro-batch's share of the step's target tokens and adds step_loss once per optimizer
step, so --grad-accum 2 --batch-size 4 computes the gradient of --batch-size 8. A method never counts
steps or micro-batches: begin_step says which step it is.

`model` is the aligned model with a fresh LoRA; `lora.disabled(model)` runs theta_safe, the aligned
model itself. `memory` is the safety memory M: tokenized harmful prompts with refusals (plus benign
prompts with helpful answers). A batch is batches.collate's dict: idx, labels, tgt_pos, tgt.
"""
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from batches import at_targets, collate
from files import load_safetensors


class Method:
    name = None  # --method NAME
    changes_frozen_weights = False  # True: end_task edits the frozen weights (MagMax); train.py then saves a merged checkpoint
    inner_flag = None  # a method that runs around another (refresh) names it in this flag; train.py builds both

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

    def begin_step(self, model, step, batches, total, lr_scale):
        pass

    def loss(self, model, batch):
        return nll(model, batch)

    def step_loss(self, model):
        return None

    def after_backward(self, model):
        pass

    def after_step(self, model):
        pass

    def end_task(self, model):
        pass

    def report(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """What a resumed run needs to go on exactly as an uninterrupted one (checkpoint.py).

        Values are tensors or JSON. The default is self.rng's state; a method whose state lives beyond
        one step extends both functions. What begin_task and data build is not saved: on --resume they
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


LOSS_ROWS = 256  # at most this many rows of logits at once in a training step's nll (see target_nll)


def nll(model, batch):
    """Mean next-token NLL over the batch's target tokens.

    Logits are computed only where there is a target: the vocabulary projection is the costliest
    matmul of a small model, and most tokens of a chat example are prompt.
    """
    return target_nll(model.lm_head, at_targets(model(batch["idx"], return_hidden=True), batch), batch["tgt"])


def target_nll(head, h, tgt):
    """Mean -log p(tgt) under the logits head(h) (h: (N, dim)).

    With a gradient to take and more than LOSS_ROWS targets, the logits are made LOSS_ROWS rows at a time and each
    chunk's gradient with respect to h is taken at once, then its logits freed (the chunked loss of torchtune and
    Liger, in plain autograd): the (N, vocab) logits, their log-softmax and its gradient never exist. Those are
    200 MB each for a 4 x 256 all-target batch of the default model and 4 GiB for 8 x 1024 over Llama 3's 128K
    vocabulary; on a CPU, writing them cost more than their arithmetic (the loss of 1020 targets, forward and
    backward, 0.91 s in one piece, 0.79 s in chunks of 256; of 2040, 2.36 s against 1.46 s; 2026-12-06, Zen 5).
    The gradient is that of one piece up to rounding: the chunks' products are the same rows, but the BLAS may sum
    a short chunk in another order (the default run's aligned model came out bitwise the same, its sft adapter not).
    """
    n = max(len(tgt), 1)
    if len(h) <= LOSS_ROWS or not h.requires_grad or any(p.requires_grad for p in head.parameters()):
        return F.cross_entropy(head(h).float(), tgt, reduction="sum") / n
    losses, grads = [], []
    for hc, tc in zip(h.detach().split(LOSS_ROWS), tgt.split(LOSS_ROWS)):
        hc.requires_grad_()
        loss = F.cross_entropy(head(hc).float(), tc, reduction="sum") / n
        grads.append(torch.autograd.grad(loss, hc)[0])
        losses.append(loss.detach())
    return WithGradient.apply(h, torch.stack(losses).sum(), torch.cat(grads))


class WithGradient(torch.autograd.Function):
    """A loss `value` of h whose gradient `grad` was taken already: backward hands it on, scaled by the loss's own."""

    @staticmethod
    def forward(ctx, h, value, grad):
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, out):
        grad, = ctx.saved_tensors
        return grad * out, None, None


def fisher(model, examples, params):
    """Diagonal Fisher over `params` from per-example gradients, each weighted by the model's probability of its answer.

        F = 1/N sum_n p_n (d l_n / d params)^2,   l_n the example's mean NLL, p_n the mean of exp(-NLL_t)
                                                    over its target tokens

    mammoth's models/ewc_on.py end_task (aimagelab/mammoth e75a491), written for classification
    (exp_cond_prob = p(y|x)), applied token-wise as its code reads on a sequence: the per-token
    log-probs averaged into the loss and their probabilities into the weight. One backward per
    example, a plain loop, as the formula reads.
    """
    fish = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = params[0].device
    for ex in examples:
        b = collate([ex], device=device)
        logits = model.lm_head(at_targets(model(b["idx"], return_hidden=True), b)).float()
        logp = -F.cross_entropy(logits, b["tgt"], reduction="none")  # (tokens,) log p_t
        p = logp.detach().exp().mean()
        for f, g in zip(fish, torch.autograd.grad(-logp.mean(), params)):
            f += p * g.float() ** 2 / len(examples)
    return fish


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def base_model_dir(args) -> Path:
    """theta_base, the unaligned checkpoint the aligned model came from (MagMax, SafeLoRA): train.py's --base-model."""
    if not getattr(args, "base_model", None):
        raise ValueError("--base-model DIR is required with --model: the unaligned checkpoint your aligned model was trained from")
    path = Path(args.base_model)
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
