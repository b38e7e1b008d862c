"""LwF, Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

    L = l(D) + lambda * T^2 * KL( softmax(z_safe / T) || softmax(z / T) )    (lambda 1.0, T 2.0)

on the response tokens of the *user* batch: no memory is needed, the teacher theta_safe is the same
model with its adapters disabled (run without gradients), z and z_safe the student's and the teacher's
logits. T^2 keeps the gradient's size independent of T (Hinton et al. 2015). --lwf-hidden instead
matches the last (normed) hidden states with L2, the variant the Unforgotten Safety paper reportedly
uses: lambda * mean over response tokens of ||h - h_safe||^2 / dim. Both terms are means over the
batch's response tokens, as the NLL.
"""
import torch
import torch.nn.functional as F

import lora
from batches import at_targets
from methods.method import Method


class LwF(Method):
    name = "lwf"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--lwf-lambda", type=float, default=1.0, help="weight of the distillation term (default 1.0)")
        parser.add_argument("--lwf-temperature", type=float, default=2.0, help="softmax temperature T (default 2.0)")
        parser.add_argument("--lwf-hidden", action="store_true",
                            help="match last hidden states with L2 instead of logits with KL (the paper's variant)")

    def loss(self, model, batch):
        h = at_targets(model(batch["idx"], return_hidden=True), batch)  # (N, dim): one forward for both terms
        with torch.no_grad(), lora.disabled(model):
            h_safe = at_targets(model(batch["idx"], return_hidden=True), batch)  # (N, dim)
        logits = model.lm_head(h).float()  # (N, vocab)
        n = max(len(batch["tgt"]), 1)
        return F.cross_entropy(logits, batch["tgt"], reduction="sum") / n + self.args.lwf_lambda * self.distill(model, h, h_safe, logits) / n

    def distill(self, model, h, h_safe, logits):
        """The distillation term summed over the N response tokens."""
        if self.args.lwf_hidden:
            return (h.float() - h_safe.float()).pow(2).mean(-1).sum()
        T = self.args.lwf_temperature
        with torch.no_grad():
            teacher = model.lm_head(h_safe).float()  # (N, vocab)
        student, teacher = F.log_softmax(logits / T, -1), F.log_softmax(teacher / T, -1)
        return T ** 2 * F.kl_div(student, teacher, log_target=True, reduction="sum")  # KL(teacher || student)
