"""Safe LoRA (Hsu et al., NeurIPS 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
Fine-tuning Large Language Models"): training-free, a projection after training.

    V = W_aligned - W_base                  per LoRA'd weight: the alignment direction
    C = V V^T / ||V||_F                     (out, out)
    delta W' = C delta W, i.e. B' = C B     for the k LoRA layers of lowest cos(C delta W, delta W)  (k 10)

Training is plain SFT; end_task projects the layers whose delta points furthest from the alignment
subspace (lowest cosine between the delta and its projection) and leaves the others untouched. B' = C B
keeps the adapter a LoRA of the same rank, so train.py saves it as usual. The cosine is scale-free, so
C's scale (1/||V||_F) only shrinks the projected delta, as in the paper. As the reference code
(IBM/SafeLoRA d81fda1, config.py and model.py): select_layers_type="number" with num_proj_layers=10 by
default (--safelora-layers; the k-th lowest cosine becomes the threshold and cos <= it is projected, so
ties may add layers); its threshold mode is --safelora-threshold TAU (projects every layer with cos <= TAU).
The reference's 10 is of a Llama-2-7B's 64 q/v layers; the default model here has 60, so k stays 10.
(With the threshold 0.5 every layer of our default model falls under it: the update is removed everywhere.)
It needs the unaligned checkpoint theta_base: train.py's --base-model (default: the default
experiment's SmolLM2-135M-Instruct; required with --model).

report(): per layer, its cosine, whether it was projected and the norm it kept, ||C dW|| / ||dW||
(1 where it was left alone), in results.json.

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
        parser.add_argument("--safelora-layers", type=int, default=10,
                            help="project the k layers of lowest cos(C dW, dW) (default 10, the reference's num_proj_layers)")
        parser.add_argument("--safelora-threshold", type=float, default=None,
                            help="project every layer with cos(C dW, dW) <= this instead (the reference's threshold mode)")
        parser.add_argument("--safelora-exact", action="store_true",
                            help="C = V V^+ (the orthogonal projection) instead of the paper's V V^T / ||V||_F")

    def __init__(self, args):
        super().__init__(args)
        if args.safelora_layers < 0:
            raise ValueError(f"--safelora-layers must be >= 0, got {args.safelora_layers}")
        self.base_dir = base_model_dir(args)
        self.layers = []

    def end_task(self, model):
        self.layers = project(model, base_weights(model, self.base_dir), self.args.safelora_layers,
                              self.args.safelora_threshold, self.args.safelora_exact)
        print(f"safelora: projected {sum(r['projected'] for r in self.layers)} of {len(self.layers)} LoRA layers")

    def report(self):
        return {"safelora": self.layers}


def projector(v, exact=False):
    """C for V (out, in): V V^T / ||V||_F, or with `exact` the orthogonal projection onto V's columns."""
    v = v.float()
    return v @ torch.linalg.pinv(v) if exact else v @ v.T / v.norm()


@torch.no_grad()
def project(model, base, k=10, threshold=None, exact=False):
    """B <- C B for the k LoRA layers of lowest cos(C dW, dW) (or, given a threshold, those with cos <= it), in place.

    Returns one {name, cos, projected, kept} per layer, kept = ||C dW|| / ||dW|| where projected, else 1.
    A layer the alignment left alone (V = 0) or with a zero delta is never projected (cos None).
    """
    lora.unmerge(model)
    layers = []
    for name, m in lora.lora_layers(model):
        v = m.weight.float() - base[f"{name}.weight"].to(m.weight.device, torch.float32)  # (out, in)
        delta = m.delta().float()
        c = projector(v, exact) if v.any() else None  # (out, out)
        cos = None if c is None or not delta.any() else \
            round(torch.nn.functional.cosine_similarity((c @ delta).flatten(), delta.flatten(), dim=0).item(), 5)  # the reference rounds so
        layers.append(dict(name=name, cos=cos, projected=False, kept=1.0, c=c, m=m, delta=delta))
    cosines = sorted(l["cos"] for l in layers if l["cos"] is not None)
    if threshold is None:
        threshold = cosines[min(k, len(cosines)) - 1] if k > 0 and cosines else float("-inf")
    for l in layers:
        if l["cos"] is not None and l["cos"] <= threshold:
            c, m = l["c"], l["m"]
            l.update(projected=True, kept=float((c @ l["delta"]).norm() / l["delta"].norm()))
            m.lora_B.weight.copy_((c @ m.lora_B.weight.float()).to(m.lora_B.weight.dtype))
    return [{k: l[k] for k in ("name", "cos", "projected", "kept")} for l in layers]
