"""MagMax: model merging by maximum magnitude (Marczak et al., ECCV 2024, "MagMax: Leveraging Model
Merging for Seamless Continual Learning").

    tau_safe = W_aligned - W_base            the provider's safety alignment, the first task vector
    tau_user = W_user - W_base               the model after sequential fine-tuning (= tau_safe + delta W)
    tau      = per entry, whichever of tau_safe, tau_user has the larger magnitude (ties: tau_user)
    W        = W_base + lambda * tau                                       (lambda: --magmax-scale 1.0)

As the authors' code (danielm1405/magmax 4f49f18, src/merging/task_vectors.py merge_max_abs and
merge_splitted.py): the tasks are fine-tuned in sequence, each task vector is taken from the
pre-trained theta_0 (here theta_base), the larger magnitude wins per entry with ties to the later task
(a fold with >=), over every weight. Training is plain SFT; the merge runs in end_task. Where there is
no LoRA, tau_user = tau_safe and the entry is W_base + lambda * tau_safe.

lambda: the authors hard-code 0.5 for merging 5-20 task vectors (a fold of many maxima overshoots
each task's own vector); with the two vectors here, lambda 1 is the one scale at which every entry
is exactly either the aligned model's or the fine-tuned model's: the merge chooses, per entry, which
model to keep, and adds nothing. (Measured before this choice, poisoned seed 0: at 0.5 the merge
halves the safety vector too and ASR rose from 45% to 65%; not used to choose, which we did by the rule
above, but it is why copying 0.5 would mislead.) --magmax-delta merges the LoRA delta alone,
tau_user = delta W (this code's form until 2026-12): where |delta W| > |tau_safe| the entry becomes
W_base + delta W and the alignment there is deleted.

The merged weights go into the frozen weights and the LoRA's B is zeroed, so the model in memory is the
merged one and train.py saves a merged checkpoint (changes_frozen_weights). A further task starts from
the merged model and merges its own vector into the running result (max magnitude is associative;
lambda is applied once); the authors' sequence starts each task from the unmerged previous one.
It needs the unaligned checkpoint theta_base: train.py's --base-model (default: the default
experiment's SmolLM2-135M-Instruct; required with --model). The same merge for a finished run:

    python -m methods.magmax --model ALIGNED --base-model BASE --adapter RUN/adapter --out DIR [--scale 1.0]
"""
import argparse

import torch

import lora
from cli import one_line_errors
from methods.method import Method, base_model_dir, base_weights
from model import Transformer


class MagMax(Method):
    name = "magmax"
    changes_frozen_weights = True

    @staticmethod
    def add_args(parser):
        parser.add_argument("--magmax-scale", type=float, default=1.0, help="lambda, the merged vector's scale (default 1.0)")
        parser.add_argument("--magmax-delta", action="store_true",
                            help="tau_user = the LoRA delta alone instead of W_user - W_base (MagMax's sequential form)")

    def __init__(self, args):
        super().__init__(args)
        if args.magmax_scale <= 0:
            raise ValueError(f"--magmax-scale must be positive, got {args.magmax_scale}")
        self.base_dir = base_model_dir(args)
        self.prior_scale = 1.0  # the aligned model is W_base + 1 * tau_safe

    def end_task(self, model):
        merge(model, base_weights(model, self.base_dir), self.args.magmax_scale, self.args.magmax_delta, self.prior_scale)
        self.prior_scale = self.args.magmax_scale


def max_magnitude(a, b):
    """Per entry, the one of a, b with the larger magnitude (b, the later task, on ties)."""
    return torch.where(b.abs() >= a.abs(), b, a)


@torch.no_grad()
def merge(model, base, scale=1.0, delta_only=False, prior_scale=1.0):
    """W <- W_base + scale * maxmag(tau, tau_user) for every weight, in place; the LoRAs are zeroed after.

    base: theta_base's tensors by parameter name (methods.method.base_weights). tau = (W - W_base) / prior_scale
    is the model's own task vector (tau_safe for the aligned model); tau_user = tau + its LoRA delta,
    or the delta alone with `delta_only`.
    """
    lora.unmerge(model)
    layers = {f"{n}.weight": m for n, m in lora.lora_layers(model)}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        w_base = base[name].to(p.device, torch.float32)
        tau = (p.float() - w_base) / prior_scale
        if name in layers:
            delta = layers[name].delta().float()
            tau = max_magnitude(tau, delta if delta_only else tau + delta)
        p.copy_((w_base + scale * tau).to(p.dtype))
    for m in layers.values():  # the delta now lives in the weights
        m.lora_B.weight.zero_()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description="MagMax-merge a finished run's LoRA with the safety vector; write a merged checkpoint.")
    p.add_argument("--model", required=True, help="the aligned checkpoint the run started from")
    p.add_argument("--base-model", required=True, help="the unaligned checkpoint the aligned one was trained from")
    p.add_argument("--adapter", required=True, help="the run's adapter directory (OUT/adapter)")
    p.add_argument("--out", required=True, help="where to write the merged checkpoint")
    p.add_argument("--scale", type=float, default=1.0, help="lambda (default 1.0)")
    p.add_argument("--delta", action="store_true", help="tau_user = the LoRA delta alone instead of W_user - W_base")
    args = p.parse_args(argv)
    with one_line_errors():  # a missing or mismatched checkpoint or adapter: one line
        model = lora.load_adapter(Transformer.from_pretrained(args.model), args.adapter)
        merge(model, base_weights(model, args.base_model), args.scale, args.delta)
        model.save_pretrained(args.out, tokenizer_from=args.model)
    print(f"wrote the MagMax merge (scale {args.scale}) to {args.out}")


if __name__ == "__main__":
    main()
