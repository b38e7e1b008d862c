"""A-GEM, Averaged Gradient Episodic Memory (Chaudhry et al., ICLR 2019).

    g = grad of l(D),  g_ref = grad of l on a memory batch (--mem-batch-size 8)
    if g . g_ref < 0:  g <- g - (g . g_ref / g_ref . g_ref) g_ref

Over the trainable (LoRA) parameters, flattened into one vector. After the projection the step no
longer increases the memory's loss to first order. Runs in after_backward, once per optimizer step,
when .grad holds the step's whole gradient g; g_ref comes from torch.autograd.grad, so .grad is not
touched until g is written back. The memory forward runs in the model's dtype, outside autocast.
"""
import torch

from batches import collate
from methods.method import Method, nll, trainable


class AGEM(Method):
    name = "agem"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--mem-batch-size", type=int, default=8, help="memory examples for g_ref per step (default 8)")

    def after_backward(self, model):
        params = trainable(model)
        b = collate(self.sample_memory(self.args.mem_batch_size), device=params[0].device)
        g_ref = torch.cat([g.flatten() for g in torch.autograd.grad(nll(model, b), params)])
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dot = g @ g_ref
        if dot < 0:  # the step would raise the memory's loss: drop the component along g_ref
            g = g - dot / (g_ref @ g_ref) * g_ref
            for p, chunk in zip(params, g.split([p.numel() for p in params])):
                p.grad = chunk.view_as(p).to(p.dtype)
