"""EWC, Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

    L = l(D) + (lambda / 2) * sum_i F_i (theta_i - theta_safe_i)^2          (lambda default 1e5)

With a fresh LoRA, theta - theta_safe is the LoRA delta, delta W = (alpha / r) B A. The Fisher is taken
over the *effective weights* W of each LoRA'd layer, not over A and B: at theta_safe B = 0, so every
gradient with respect to A is zero and a Fisher over the factors would not protect anything.
dl/dW equals dl/d(delta W), so F_W = (dl/dW)^2 at theta_safe (adapters disabled), one entry per weight.

F is the *empirical batch Fisher*: the squared gradient of a memory batch's mean NLL, averaged over
batches (--fisher-batch-size 8). One backward per batch instead of one per example (the per-example
loop is the slow part of common EWC code); the price is that noise averages out inside a batch, so
F shrinks by up to the batch size -- a constant factor that lambda absorbs. The gradients of a model
that already refuses are tiny: on the default model (SmolLM2-135M aligned, r 8 on q,v) the mean F entry
is 3e-7, and the drift of plain SFT (lr 1e-3) gives sum F (delta W)^2 = 1.5e-5 to 5e-5, which
lambda 1e5 prices at 0.7-2.3 nats, the size of the task loss (one peer used 1e9 on 7B models).
F is kept in fp32, one float per weight of the LoRA'd layers.
"""
import math

import torch

import lora
from batches import collate
from methods.method import Method, nll


class EWC(Method):
    name = "ewc"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--ewc-lambda", type=float, default=1e5, help="weight of the Fisher penalty (default 1e5)")
        parser.add_argument("--fisher-batch-size", type=int, default=8, help="memory examples per Fisher batch (default 8)")
        parser.add_argument("--fisher-batches", type=int, default=0, help="Fisher batches used (default 0 = the whole memory)")

    def begin_task(self, model, task, memory):
        super().begin_task(model, task, memory)
        layers = [m for _, m in lora.lora_layers(model)]
        self.fisher = list(zip(layers, fisher(model, memory, self.args)))  # [(LoRALinear, F (out, in))]

    def step_loss(self, model):  # the penalty is the step's, once whatever --grad-accum
        penalty = 0.0
        for m, f in self.fisher:
            with torch.autocast(f.device.type, enabled=False):  # fp32: F is tiny and the delta small
                penalty = penalty + (f * m.delta() ** 2).sum()
        return self.args.ewc_lambda / 2 * penalty


def fisher(model, memory, args):
    """Diagonal empirical batch Fisher of the memory at theta_safe, one (out, in) tensor per LoRA layer."""
    weights = [m.weight for _, m in lora.lora_layers(model)]
    device = weights[0].device
    size = args.fisher_batch_size
    n = math.ceil(len(memory) / size)
    n = min(n, args.fisher_batches) if args.fisher_batches > 0 else n
    F = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    for w in weights:  # frozen by LoRA; autograd.grad needs them to require grad, only for this
        w.requires_grad_(True)
    try:
        with lora.disabled(model):
            for i in range(n):
                b = collate(memory[i * size: (i + 1) * size], device=device)
                for f, g in zip(F, torch.autograd.grad(nll(model, b), weights)):
                    f += g.float() ** 2 / n
    finally:
        for w in weights:
            w.requires_grad_(False)
    return F
