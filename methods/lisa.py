"""Lisa, Lazy safety alignment (Huang et al., NeurIPS 2024, "Lisa: Lazy Safety Alignment for Large
Language Models against Harmful Fine-tuning Attack"): bi-state optimisation.

    alignment state, K1 steps:   min  l(M) + (rho / 2) ||w - w_switch||^2        (K1 = --lisa-align-steps 2)
    fine-tuning state, K2 steps: min  l(D) + (rho / 2) ||w - w_switch||^2        (K2 = --lisa-user-steps 18)

w are the trainable (LoRA) parameters and w_switch their value when the current state began (the last
iterate of the other state), so the term is zero at each switch and grows with the drift from it;
rho = --lisa-rho 1.0 (the Lisa scripts' value). The run starts in the alignment state, as Lisa's
does, and cycles K1, K2, K1, ... optimizer steps. In the alignment state each user micro-batch is
replaced by a memory batch of the same size (the user batch is skipped, as in Lisa's trainer). The
Lisa scripts use K1 = 100, K2 = 900 over thousands of steps; the default run here has ~55 steps, so
the same 1:9 split is scaled down to 2:18 (three alignment stints). Not measured on the default model.
Lisa's trainer leaves out the proximal term for the first 10% of the steps; here it is always on.
"""
import torch

from batches import collate
from methods.method import Method, nll, trainable


class Lisa(Method):
    name = "lisa"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--lisa-align-steps", type=int, default=2, help="K1, optimizer steps on the safety memory per cycle (default 2)")
        parser.add_argument("--lisa-user-steps", type=int, default=18, help="K2, optimizer steps on the user data per cycle (default 18)")
        parser.add_argument("--lisa-rho", type=float, default=1.0, help="rho of the proximal term (default 1.0)")

    def __init__(self, args):
        super().__init__(args)
        if args.lisa_align_steps < 0 or args.lisa_user_steps < 0 or args.lisa_align_steps + args.lisa_user_steps == 0:
            raise ValueError("--lisa-align-steps and --lisa-user-steps must be >= 0 and not both 0")

    def aligning_at(self, step):
        """True if optimizer step `step` (0-based, of the task) is in the alignment state."""
        k1, k2 = self.args.lisa_align_steps, self.args.lisa_user_steps
        return step % (k1 + k2) < k1

    def begin_step(self, model, step, batches):
        self.aligning = self.aligning_at(step)
        if step == 0 or self.aligning != self.aligning_at(step - 1):  # a new state: w_switch = w, after the last update
            self.anchor = [p.detach().clone() for p in trainable(model)]

    def loss(self, model, batch):
        if self.aligning:  # a memory batch of the same size instead of the user's
            return nll(model, collate(self.sample_memory(len(batch["idx"])), device=batch["idx"].device))
        return nll(model, batch)

    def step_loss(self, model):
        return self.args.lisa_rho / 2 * self.proximal(model)

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
