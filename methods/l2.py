"""L2: keep the weights near the aligned model (the isotropic special case of EWC, F = 1).

    L = l(D) + (lambda / 2) * sum over LoRA layers of || delta W ||_F^2,    delta W = (alpha / r) B A

theta_safe is the model with its fresh LoRA disabled, so theta - theta_safe is exactly the LoRA delta
and the penalty is zero at the start (B = 0). ||B A||_F^2 = sum((B^T B) * (A A^T)) with two (r, r)
matrices, so the (out, in) delta is never built. --l2-lambda 0.1 (default): plain SFT of the default
model (SmolLM2-135M, r 8 on q,v, lr 1e-3) ends at sum ||delta W||^2 = 10-50, which lambda 0.1 prices
at 0.5-2.6 nats, the size of the task loss, so the two terms compete; 0 is SFT.
"""
import torch

import lora
from methods.method import Method


def drift(model):
    """sum over LoRA layers of ||delta W||_F^2, in fp32 even under autocast (the drift is small)."""
    total = 0.0
    for _, m in lora.lora_layers(model):
        a, b = m.lora_A.weight, m.lora_B.weight  # (r, in), (out, r)
        with torch.autocast(a.device.type, enabled=False):
            total = total + m.scale ** 2 * ((b.T @ b) * (a @ a.T)).sum()
    return total


class L2(Method):
    name = "l2"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--l2-lambda", type=float, default=0.1,
                            help="weight of (1/2) ||delta W||^2, the drift from theta_safe (default 0.1)")

    def step_loss(self, model):  # the penalty is the step's, once whatever --grad-accum
        return self.args.l2_lambda / 2 * drift(model)
