"""EWC, Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

    L = l(D) + (lambda / 2) * sum_i F_i (theta_i - theta_safe_i)^2          (lambda default 1e5)

With a fresh LoRA, theta - theta_safe is the LoRA delta, delta W = (alpha / r) B A. The Fisher is taken
over the *effective weights* W of each LoRA'd layer, not over A and B: at theta_safe B = 0, so every
gradient with respect to A is zero and a Fisher over the factors would not protect anything.
dl/dW equals dl/d(delta W), so F_W = (dl/dW)^2 at theta_safe (adapters disabled), one entry per weight.

F is the empirical Fisher of mammoth's EWC (models/ewc_on.py, aimagelab/mammoth e75a491): the mean over
the memory's examples of each example's squared gradient, weighted by the model's probability of its
answer (methods.method.fisher), one backward per example (--fisher-examples caps them; 0 = the whole
memory). One past task, so mammoth's online decay gamma does not arise. mammoth's penalty is
lambda * sum F d^2; the paper's, used here, lambda / 2 * sum F d^2.

lambda was set from measured magnitudes, not tuned on the evaluation: on the default model
(SmolLM2-135M aligned, r 8 on q,v) the mean F entry is 3.5e-7 and the drift of plain SFT (seed 0,
poisoned, lr 1e-3, its final adapter) gives sum F (delta W)^2 = 5.2e-5, which lambda 1e5 prices at
2.6 nats, the size of the task loss at the start (1.4). (The batch Fisher this file used until 2026-12,
the squared gradient of 8-example means, is 7x smaller there: 7.4e-6, priced at 0.4 nats.)
F is kept in fp32, one float per weight of the LoRA'd layers.
"""
import torch

import lora
from methods.method import Method, fisher


class EWC(Method):
    name = "ewc"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--ewc-lambda", type=float, default=1e5, help="weight of the Fisher penalty (default 1e5)")
        parser.add_argument("--fisher-examples", type=int, default=0, help="memory examples in the Fisher (default 0 = all)")

    def begin_task(self, model, task, memory):
        super().begin_task(model, task, memory)
        layers = [m for _, m in lora.lora_layers(model)]
        self.fisher = list(zip(layers, weight_fisher(model, memory, self.args.fisher_examples)))  # [(LoRALinear, F (out, in))]

    def step_loss(self, model):  # the penalty is the step's, once whatever --grad-accum
        penalty = 0.0
        for m, f in self.fisher:
            with torch.autocast(f.device.type, enabled=False):  # fp32: F is tiny and the delta small
                penalty = penalty + (f * m.delta() ** 2).sum()
        return self.args.ewc_lambda / 2 * penalty


def weight_fisher(model, memory, n=0):
    """The Fisher of the memory (its first n examples; 0 = all) at theta_safe, one (out, in) tensor per LoRA'd weight."""
    weights = [m.weight for _, m in lora.lora_layers(model)]
    for w in weights:  # frozen by LoRA; autograd.grad needs them to require grad, only for this
        w.requires_grad_(True)
    try:
        with lora.disabled(model):
            return fisher(model, memory[:n] if n > 0 else memory, weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
