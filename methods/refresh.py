"""Refresh Learning (Wang et al., ICLR 2024, "A Unified and General Framework for Continual
Learning"): a plug-in around another method (--refresh-inner, default sft) that first unlearns the
current data a little, then relearns it.

    unlearn:  w <- w + gamma * (1 + c F)^-1 * (||w|| g / ||g|| + sigma * xi),  g = grad l(batch), per tensor
    relearn:  the inner method's step, its gradient taken at the unlearned w

The paper's unlearning step is Langevin-like, w + gamma F^-1 g + N(0, 2 gamma F^-1); the form and the
constants here are the authors' code (joey-wang123/CL-refresh-learning 7c90da5, models/derpp.py
unlearn): gradient ascent on the current batch's loss, normalised to each tensor's norm, plus Gaussian
noise xi, damped elementwise by the Fisher F of the past task, before every step: gamma = --refresh-lr
1e-5 (their delta), sigma = --refresh-noise 0.001, c = --refresh-fisher 0.001. Here the past task is
safety: F is the Fisher of the safety memory over the LoRA parameters at begin_task, per example and
probability-weighted as theirs (methods.method.fisher). (With a fresh LoRA, B = 0, so F is zero for A
and A is unlearned undamped, and B, of norm 0, moves only by the noise at first; our F entries are
~1e-7, so c F is ~1e-10 and damps nothing, as in the authors' first task, where F is zero.)

Their gamma is constant while the optimizer's learning rate steps down; --refresh-follow-lr scales it
by the schedule (gamma * lr_t / lr) instead. --refresh-every k unlearns on every k-th optimizer step
(default 1: every step, as theirs; each costs one extra forward and backward), on the whole step's
data (g is the mean over its micro-batches, weighted by their target tokens, so --grad-accum does not
change it). gamma = 0 is exactly the inner method. Until 2026-12 the default gamma was 0.01, 1000x
theirs, with F divided by its mean and c 1: it unlearned the arithmetic task (4% accuracy).
Under torchrun each process would unlearn on its own share and the copies would part: train.py
refuses refresh there.
"""
import torch

from methods.method import Method, fisher, nll, trainable


class Refresh(Method):
    name = "refresh"
    inner_flag = "refresh_inner"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--refresh-inner", default="sft", help="the method refresh runs around (default sft); its flags apply too")
        parser.add_argument("--refresh-lr", type=float, default=1e-5, help="gamma, the unlearning step relative to each tensor's norm (default 1e-5)")
        parser.add_argument("--refresh-every", type=int, default=1, help="unlearn every k-th optimizer step (default 1)")
        parser.add_argument("--refresh-noise", type=float, default=1e-3, help="sigma, the unlearning noise (default 0.001)")
        parser.add_argument("--refresh-fisher", type=float, default=1e-3, help="c, the Fisher damping of the unlearning (default 0.001; 0 = none)")
        parser.add_argument("--refresh-follow-lr", action="store_true", help="scale gamma by the learning-rate schedule (default: constant, as the authors)")

    def __init__(self, args, inner):
        super().__init__(args)
        if args.refresh_lr < 0 or args.refresh_every < 1:
            raise ValueError("--refresh-lr must be >= 0 and --refresh-every >= 1")
        self.inner = inner  # built by methods.make from the same args: its own rng, seeded as if it ran alone
        self.changes_frozen_weights = inner.changes_frozen_weights

    def begin_task(self, model, task, memory):
        self.fisher = None
        if self.args.refresh_lr > 0 and self.args.refresh_fisher > 0:
            self.fisher = fisher(model, memory, trainable(model))
        self.inner.begin_task(model, task, memory)

    def data(self, task, memory):
        return self.inner.data(task, memory)

    def begin_step(self, model, step, batches, total, lr_scale):
        if self.args.refresh_lr > 0 and step % self.args.refresh_every == 0:
            self.unlearn(model, batches, self.args.refresh_lr * (lr_scale if self.args.refresh_follow_lr else 1.0))
        self.inner.begin_step(model, step, batches, total, lr_scale)

    def loss(self, model, batch):
        return self.inner.loss(model, batch)  # relearn, at the unlearned weights

    def step_loss(self, model):
        return self.inner.step_loss(model)

    def unlearn(self, model, batches, gamma):
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
                p.add_(gamma * step.to(p.dtype))

    def after_backward(self, model):
        self.inner.after_backward(model)

    def after_step(self, model):
        self.inner.after_step(model)

    def report(self):
        return self.inner.report()

    def end_task(self, model):
        self.inner.end_task(model)

    def state_dict(self):
        # the inner method's state goes in flat, "inner." before its keys: checkpoints store only top-level tensors as tensors
        return {**super().state_dict(), **{f"inner.{k}": v for k, v in self.inner.state_dict().items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.inner.load_state_dict({k[len("inner."):]: v for k, v in state.items() if k.startswith("inner.")})

