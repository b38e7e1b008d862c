"""Refresh Learning (Wang et al., ICLR 2024, "A Unified and General Framework for Continual
Learning"): a plug-in around another method (--refresh-inner, default sft) that first unlearns the
current data a little, then relearns it.

    unlearn:  w <- w + gamma * (1 + c F / mean F)^-1 * (||w|| g / ||g|| + sigma * xi),  g = grad l(batch)
    relearn:  the inner method's step, its gradient taken at the unlearned w

The paper's unlearning step is Langevin-like, w + gamma F^-1 g + N(0, 2 gamma F^-1); we follow the
authors' code for its concrete form: per parameter tensor, gradient ascent on the current batch's NLL
with the step normalised to the tensor's norm, plus Gaussian noise xi (sigma = --refresh-noise 0.001),
damped where the Fisher F of the past task is large (1 / (1 + c F), c = --refresh-fisher 1; F is
divided by its mean so that c is scale-free). Here the past task is safety: F is the diagonal batch
Fisher of the safety memory over the LoRA parameters, taken at begin_task. (With a fresh LoRA, B = 0,
so F is zero for A and A is unlearned undamped, and B, of norm 0, moves only by the noise at first.)

gamma = --refresh-lr 0.01: a step of 1% of each tensor's norm, a quarter of an Adam step at lr 1e-3 on
the default model's A (entries ~0.02); the authors' code uses 1e-5 with SGD on CNNs. Not tuned.
--refresh-every k unlearns on every k-th optimizer step (default 1: every step; each costs one extra
forward and backward), on the whole step's data (g is the mean over its micro-batches, weighted by
their target tokens, so --grad-accum does not change it). gamma = 0 is exactly the inner method.
Under torchrun each process would unlearn on its own share and the copies would part: train.py
refuses refresh there.
"""
import math

import torch

from batches import collate
from methods.method import Method, nll, trainable


class Refresh(Method):
    name = "refresh"
    inner_flag = "refresh_inner"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--refresh-inner", default="sft", help="the method refresh runs around (default sft); its flags apply too")
        parser.add_argument("--refresh-lr", type=float, default=0.01, help="gamma, the unlearning step relative to each tensor's norm (default 0.01)")
        parser.add_argument("--refresh-every", type=int, default=1, help="unlearn every k-th optimizer step (default 1)")
        parser.add_argument("--refresh-noise", type=float, default=1e-3, help="sigma, the unlearning noise (default 0.001)")
        parser.add_argument("--refresh-fisher", type=float, default=1.0, help="c, the Fisher damping of the unlearning (default 1; 0 = none)")

    def __init__(self, args, inner):
        super().__init__(args)
        if args.refresh_lr < 0 or args.refresh_every < 1:
            raise ValueError("--refresh-lr must be >= 0 and --refresh-every >= 1")
        self.inner = inner  # built by methods.make from the same args: its own rng, seeded as if it ran alone
        self.changes_frozen_weights = inner.changes_frozen_weights

    def begin_task(self, model, task, memory):
        self.fisher = None
        if self.args.refresh_lr > 0 and self.args.refresh_fisher > 0:
            self.fisher = fisher(model, memory)
        self.inner.begin_task(model, task, memory)

    def data(self, task, memory):
        return self.inner.data(task, memory)

    def begin_step(self, model, step, batches):
        if self.args.refresh_lr > 0 and step % self.args.refresh_every == 0:
            self.unlearn(model, batches)
        self.inner.begin_step(model, step, batches)

    def loss(self, model, batch):
        return self.inner.loss(model, batch)  # relearn, at the unlearned weights

    def step_loss(self, model):
        return self.inner.step_loss(model)

    def unlearn(self, model, batches):
        params = trainable(model)
        n = sum(len(b["tgt"]) for b in batches)
        grads = None
        for b in batches:  # the gradient of the step's mean NLL, to ascend
            g = torch.autograd.grad(nll(model, b) * (len(b["tgt"]) / n), params)
            grads = g if grads is None else [a + c for a, c in zip(grads, g)]
        damp = self.fisher or [None] * len(params)
        with torch.no_grad():
            for p, g, f in zip(params, grads, damp):
                step = p.norm() / (g.norm() + 1e-20) * g + self.args.refresh_noise * torch.randn_like(p)
                if f is not None:
                    step = step / (1 + self.args.refresh_fisher * f)
                p.add_(self.args.refresh_lr * step.to(p.dtype))

    def after_backward(self, model):
        self.inner.after_backward(model)

    def end_task(self, model):
        self.inner.end_task(model)

    def state_dict(self):
        # the inner method's state goes in flat, "inner." before its keys: checkpoints store only top-level tensors as tensors
        return {**super().state_dict(), **{f"inner.{k}": v for k, v in self.inner.state_dict().items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.inner.load_state_dict({k[len("inner."):]: v for k, v in state.items() if k.startswith("inner.")})


def fisher(model, memory, size=8):
    """Diagonal empirical batch Fisher of the memory over the trainable parameters, divided by its mean."""
    params = trainable(model)
    F = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n = math.ceil(len(memory) / size)
    for i in range(n):
        b = collate(memory[i * size: (i + 1) * size], device=params[0].device)
        for f, g in zip(F, torch.autograd.grad(nll(model, b), params)):
            f += g.float() ** 2 / n
    mean = sum(f.sum() for f in F) / sum(f.numel() for f in F)
    return [f / mean for f in F] if mean > 0 else None
