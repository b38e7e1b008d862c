"""A-GEM, Averaged Gradient Episodic Memory (Chaudhry et al., ICLR 2019).

    g_ref = grad of l on a memory batch (--mem-batch-size 8), at the weights before the step
    u     = the step the optimizer takes (w_new - w)
    if u . g_ref > 0:  u <- u - (u . g_ref / g_ref . g_ref) g_ref

A-GEM's guarantee is that the step does not raise the memory's loss to first order: g_ref . u <= 0.
The paper and mammoth (models/agem.py, aimagelab/mammoth e75a491) project the gradient g and step with
plain SGD, where u = -lr g and the two rules are the same. Our runs use AdamW (every method alike), whose
per-coordinate scaling and momentum turn a projected gradient into a step that can still point up the
memory's loss; so the projection is applied to the step AdamW takes (after_step), which keeps the
guarantee for the step actually taken. --agem-project gradient is the paper's rule on the gradient
before AdamW (the guarantee holds only for SGD). Over the trainable (LoRA) parameters, flattened into
one vector; the memory forward runs in the model's dtype, outside autocast.

report(): per step, whether the projection fired, cos(g, g_ref) (the user gradient against the memory's),
cos(u, -g_ref) before the projection (does the optimizer's step lower the memory's loss?) and the
memory batch's loss; results.json's history carries them (the fixed probe of every run's losses is
the memory loss to compare with SFT's).
"""
import torch

from batches import collate
from methods.method import Method, nll, trainable


class AGEM(Method):
    name = "agem"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--mem-batch-size", type=int, default=8, help="memory examples for g_ref per step (default 8)")
        parser.add_argument("--agem-project", choices=("update", "gradient"), default="update",
                            help="project the optimizer's step (default; keeps the guarantee with AdamW) or the gradient (the paper's SGD rule)")

    def begin_task(self, model, task, memory):
        super().begin_task(model, task, memory)
        self.steps = []  # per step: fired, cos_grad, cos_update, memory_loss

    def after_backward(self, model):
        params = trainable(model)
        b = collate(self.sample_memory(self.args.mem_batch_size), device=params[0].device)
        loss = nll(model, b)
        self.g_ref = torch.cat([g.flatten().float() for g in torch.autograd.grad(loss, params)])
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])
        self.record = dict(cos_grad=cosine(g, self.g_ref), memory_loss=loss.item())
        if self.args.agem_project == "gradient":
            dot = g @ self.g_ref
            self.record["fired"] = bool(dot < 0)
            if dot < 0:  # the step would raise the memory's loss: drop the component along g_ref
                write(params, g - dot / (self.g_ref @ self.g_ref) * self.g_ref, grad=True)
        else:
            self.before = [p.detach().clone() for p in params]

    def after_step(self, model):
        params = trainable(model)
        if self.args.agem_project == "update":
            u = torch.cat([(p.detach() - w).flatten().float() for p, w in zip(params, self.before)])
            dot = u @ self.g_ref
            self.record.update(fired=bool(dot > 0), cos_update=cosine(u, -self.g_ref))
            if dot > 0:  # the step raises the memory's loss to first order: drop its component along g_ref
                u = u - dot / (self.g_ref @ self.g_ref) * self.g_ref
                write(params, torch.cat([w.flatten().float() for w in self.before]) + u)
            del self.before
        self.steps.append(self.record)

    def report(self):
        fired = [s["fired"] for s in self.steps]
        return {"agem": {"project": self.args.agem_project, "fired_share": sum(fired) / max(1, len(fired)), "steps": self.steps}}

    def state_dict(self):
        return {**super().state_dict(), "steps": getattr(self, "steps", [])}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.steps = list(state.get("steps", []))


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@torch.no_grad()
def write(params, flat, grad=False):
    """Write a flat vector into the parameters (or, with grad, their gradients)."""
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        if grad:
            p.grad = chunk.view_as(p).to(p.dtype)
        else:
            p.copy_(chunk.view_as(p))
