"""Lisa, Lazy safety alignment (Huang et al., NeurIPS 2024, "Lisa: Lazy Safety Alignment for Large
Language Models against Harmful Fine-tuning Attack"): bi-state optimisation.

    alignment state, K1 steps:   min  l(M) + (rho / 2) ||w - w_switch||^2
    fine-tuning state, K2 steps: min  l(D) + (rho / 2) ||w - w_switch||^2

w are the trainable (LoRA) parameters and w_switch their value when the current state began (the last
iterate of the other state), so the term is zero at each switch and grows with the drift from it.
As the authors' code (git-disl/Lisa 68e3659, trainer.py LisaTrainer check_mode / switch_model /
training_step, and script/finetune/lisa_poison_ratio.sh): the run starts in the alignment state and
cycles K1, K2, K1, ... optimizer steps; in the alignment state each user micro-batch is replaced by a
memory batch of the same size (the user batch is skipped); the proximal term is left out of the
first 10% of the steps (theirs: "It will downgrade benign accuracy"); rho = --lisa-rho 1 (the script's).

K1, K2: the script's 100 and 900 over its 20000 steps (5000 examples, batch 5, 20 epochs): 20 cycles.
Scaled to a run of T steps by the same share, K1 = max(1, round(T / 200)) and K2 = 9 K1, which gives
100 / 900 at T = 20000 and the shortest cycle with their split, 1 / 9, for our default run (~60 steps:
6 cycles instead of 20, since a cycle cannot be shorter than 10 steps). --lisa-align-steps and
--lisa-user-steps set them by hand. Their learning rate is 1e-5 for Lisa and for SFT alike; here every
method runs at the experiment's --lr (1e-3), so the proximal term's pull, rho * drift, meets steps ~100x
larger than theirs. (Until 2026-12: K1 2, K2 18 and the term always on.)
"""
import torch

from batches import collate
from methods.method import Method, nll, trainable

PROXIMAL_FROM = 0.1  # the share of the steps that run without the proximal term (Lisa's trainer)


class Lisa(Method):
    name = "lisa"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--lisa-align-steps", type=int, default=None, help="K1, optimizer steps on the safety memory per cycle (default max(1, round(steps / 200)))")
        parser.add_argument("--lisa-user-steps", type=int, default=None, help="K2, optimizer steps on the user data per cycle (default 9 max(1, round(steps / 200)))")
        parser.add_argument("--lisa-rho", type=float, default=1.0, help="rho of the proximal term (default 1.0)")

    def __init__(self, args):
        super().__init__(args)
        k1, k2 = args.lisa_align_steps, args.lisa_user_steps
        if (k1 is not None and k1 < 0) or (k2 is not None and k2 < 0) or (k1 == 0 and k2 == 0):
            raise ValueError("--lisa-align-steps and --lisa-user-steps must be >= 0 and not both 0")

    def schedule(self, total):
        """(K1, K2) for a task of `total` optimizer steps: the flags, or the reference's split scaled (docstring)."""
        k = max(1, round(total / 200))
        k1, k2 = self.args.lisa_align_steps, self.args.lisa_user_steps
        return (k if k1 is None else k1), (9 * k if k2 is None else k2)

    def aligning_at(self, step, total):
        """True if optimizer step `step` (0-based, of the task's `total`) is in the alignment state."""
        k1, k2 = self.schedule(total)
        return step % (k1 + k2) < k1

    def begin_step(self, model, step, batches, total, lr_scale):
        self.aligning = self.aligning_at(step, total)
        self.proximal_on = step > PROXIMAL_FROM * total  # the reference's `self.steps > 0.1 * max_steps`
        if step == 0 or self.aligning != self.aligning_at(step - 1, total):  # a new state: w_switch = w, after the last update
            self.anchor = [p.detach().clone() for p in trainable(model)]

    def loss(self, model, batch):
        if self.aligning:  # a memory batch of the same size instead of the user's
            return nll(model, collate(self.sample_memory(len(batch["idx"])), device=batch["idx"].device))
        return nll(model, batch)

    def step_loss(self, model):
        return self.args.lisa_rho / 2 * self.proximal(model) if self.proximal_on else None

    def proximal(self, model):
        """||w - w_switch||^2 over the trainable parameters, in fp32."""
        params = trainable(model)
        if self.anchor[0].device != params[0].device:  # loaded from a checkpoint
            self.anchor = [a.to(p.device) for p, a in zip(params, self.anchor)]
        with torch.autocast(params[0].device.type, enabled=False):
            return sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(params, self.anchor))

    def state_dict(self):  # w_switch, one tensor per parameter; the state itself follows from the step
        return {**super().state_dict(), **{f"anchor.{i}": a for i, a in enumerate(getattr(self, "anchor", []))}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "anchor.0" in state:  # on the CPU, as read from the checkpoint: proximal moves it to the model's device
            self.anchor = [state[f"anchor.{i}"] for i in range(sum(k.startswith("anchor.") for k in state))]
