"""Constrained SFT, the token-wise constrained objective of Qi et al. (ICLR 2025, "Safety Alignment
Should Be Made More Than Just a Few Tokens Deep"), Eqn 3:

    min  - sum_t (2 / beta_t) log sigmoid(beta_t * (log p_theta(y_t | x, y_<t) - log p_safe(y_t | x, y_<t)))

Its gradient is a token-weighted NLL, which is the loss computed here (paper.md's form):

    L = mean_t w_t * NLL_t,    w_t = max(1e-3, 2 (1 - sigmoid(beta_t * (log p_theta - log p_safe))))  (detached)

w_t = 1 where the model agrees with theta_safe (SFT's gradient), and w_t -> 0 for a token whose
probability has already risen well above theta_safe's: the fine-tuning cannot push the first tokens of
a response far from what the aligned model would say. p_safe comes from the same model with its LoRA
disabled (one extra forward, no gradient). beta_t by position t in the response (--csft-beta, one
value per position, the last repeated): Qi et al.'s 0.5 for t = 1, 2 for t = 2..5, 0.1 after. beta -> 0
is SFT. Qi et al. study the objective with safety data mixed in as well; here it is the objective alone.
As the authors' code (Unispac/shallow-vs-deep-alignment fb1749e, finetuning_buckets/trainer/trainer.py
soft_sft_loss and get_beta_list): the same weights, clamped below at 1e-3, the mean over every response
token of the batch, the reference the initial (aligned) model.
"""
import torch
import torch.nn.functional as F

import lora
from batches import at_targets
from methods.method import Method


class CSFT(Method):
    name = "csft"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--csft-beta", default="0.5,2,2,2,2,0.1",
                            help="beta_t for response tokens t = 1, 2, ..., the last value for all later ones "
                                 "(default 0.5,2,2,2,2,0.1)")

    def __init__(self, args):
        super().__init__(args)
        try:
            self.beta = torch.tensor([float(b) for b in args.csft_beta.split(",")])
        except ValueError:
            raise ValueError(f"--csft-beta {args.csft_beta!r}: give comma-separated numbers") from None
        if (self.beta < 0).any():
            raise ValueError(f"--csft-beta {args.csft_beta!r}: must be >= 0")

    def weights(self, logp, logp_safe, pos):
        """w_t for the N targets: log-probs under the model and theta_safe, and t (1-based) of each."""
        beta = self.beta.to(logp.device)[(pos - 1).clamp(max=len(self.beta) - 1)]
        return (2 * (1 - torch.sigmoid(beta * (logp.detach() - logp_safe)))).clamp(min=1e-3)  # the authors' clamp

    def loss(self, model, batch):
        # (N,) each target's place t in its response; tgt_pos indexes the flattened (B, T-1) targets
        pos = (batch["labels"][:, 1:] != -100).cumsum(1).flatten().index_select(0, batch["tgt_pos"])
        logp = -F.cross_entropy(model.lm_head(at_targets(model(batch["idx"], return_hidden=True), batch)).float(),
                                batch["tgt"], reduction="none")  # (N,)
        with torch.no_grad(), lora.disabled(model):
            h = at_targets(model(batch["idx"], return_hidden=True), batch)
            logp_safe = -F.cross_entropy(model.lm_head(h).float(), batch["tgt"], reduction="none")
        return -(self.weights(logp, logp_safe, pos) * logp).sum() / max(len(logp), 1)
