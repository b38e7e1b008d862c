"""Safe LoRA (Hsu et al., NeurIPS 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
Fine-tuning Large Language Models"): training-free, a projection after training.

    V = W_aligned - W_base                  per LoRA'd weight: the alignment direction
    C = V V^T / ||V||_F                     (out, out)
    delta W' = C delta W, i.e. B' = C B     only where cos(C delta W, delta W) < tau    (tau 0.5)

Training is plain SFT; end_task projects each LoRA layer whose delta points away from the alignment
subspace (low cosine between the delta and its projection) and leaves the others untouched. B' = C B
keeps the adapter a LoRA of the same rank, so train.py saves it as usual. The cosine is scale-free, so
C's scale (1/||V||_F) only shrinks the projected delta, as in the paper. tau: paper.md gives none; 0.5
is the default of the Safe LoRA reference code. It needs the unaligned checkpoint theta_base:
train.py's --base-model (default: the default experiment's SmolLM2-135M-Instruct; required with --model).

C = V V^T / ||V||_F is the paper's cheap stand-in for the projection onto V's column space; it is
not idempotent. --safelora-exact uses the orthogonal projection C = V V^+ (pinv) instead: idempotent,
but the identity wherever V has full row rank (an alignment by full fine-tuning); our default aligned
model differs from its base by a merged rank-16 LoRA, so its V has rank 16.
"""
import torch

import lora
from methods.method import Method, base_model_dir, base_weights


class SafeLoRA(Method):
    name = "safelora"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--safelora-threshold", type=float, default=0.5,
                            help="project the layers whose cos(C dW, dW) is below this (default 0.5)")
        parser.add_argument("--safelora-exact", action="store_true",
                            help="C = V V^+ (the orthogonal projection) instead of the paper's V V^T / ||V||_F")

    def __init__(self, args):
        super().__init__(args)
        self.base_dir = base_model_dir(args)

    def end_task(self, model):
        report = project(model, base_weights(model, self.base_dir), self.args.safelora_threshold, self.args.safelora_exact)
        print(f"safelora: projected {sum(r['projected'] for r in report)} of {len(report)} LoRA layers")
        self.report = report


def projector(v, exact=False):
    """C for V (out, in): V V^T / ||V||_F, or with `exact` the orthogonal projection onto V's columns."""
    v = v.float()
    return v @ torch.linalg.pinv(v) if exact else v @ v.T / v.norm()


@torch.no_grad()
def project(model, base, threshold=0.5, exact=False):
    """B <- C B for each LoRA layer whose cos(C dW, dW) < threshold, in place; one {name, cos, projected} each."""
    lora.unmerge(model)
    report = []
    for name, m in lora.lora_layers(model):
        v = m.weight.float() - base[f"{name}.weight"].to(m.weight.device, torch.float32)  # (out, in)
        delta = m.delta()
        if not v.any():  # the alignment left this weight alone: no subspace to project onto
            report.append(dict(name=name, cos=float("nan"), projected=False))
            continue
        c = projector(v, exact)  # (out, out)
        cos = torch.nn.functional.cosine_similarity((c @ delta).flatten(), delta.flatten(), dim=0).item()
        projected = delta.any().item() and cos < threshold  # a zero delta has nothing to project
        if projected:
            m.lora_B.weight.copy_(c @ m.lora_B.weight)
        report.append(dict(name=name, cos=cos, projected=bool(projected)))
    return report
