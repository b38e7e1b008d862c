"""DER, Dark Experience Replay (Buzzega et al., NeurIPS 2020).

    L = l(D) + alpha * || h_theta(x_m) - z_m ||^2        (alpha default 0.5)

There is one past task, safety, so the buffer holds the safety memory M and z_m are the logits of the
aligned model theta_safe on the response (refusal) tokens of x_m, computed once at begin_task with
the adapters disabled. The memory term is a step term: one memory batch per optimizer step, whatever
--grad-accum. Storing the whole vocabulary per token is large (49k-256k floats), so by default we
store the top-k logits per token in bf16 (--der-topk 64) and match those entries: the refusal's
likely tokens keep their values, the long tail is free. --der-topk 0 instead recomputes the
full logits from the adapter-disabled model at every step: exact, no storage, one extra forward.
"""
import torch
import torch.nn.functional as F

import lora
from batches import at_targets, collate
from methods.method import Method


class DER(Method):
    name = "der"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--alpha", type=float, default=0.5, help="weight of the logit-matching term (default 0.5)")
        parser.add_argument("--der-topk", type=int, default=64,
                            help="logits stored per token (default 64, bf16); 0 = full logits from theta_safe each step")
        parser.add_argument("--mem-batch-size", type=int, default=4, help="memory examples per step (default 4)")

    @torch.no_grad()
    def begin_task(self, model, task, memory):
        super().begin_task(model, task, memory)
        k = self.args.der_topk
        if k <= 0:
            return
        device = model.lm_head.weight.device
        with lora.disabled(model):
            for i in range(0, len(memory), 16):
                chunk = memory[i: i + 16]
                b = collate(chunk, device=device)
                top = model.lm_head(at_targets(model(b["idx"], return_hidden=True), b)).float().topk(k, dim=-1)
                sizes = (b["labels"][:, 1:] != -100).sum(1).tolist()  # each example's target tokens, in order
                for e, v, j in zip(chunk, top.values.split(sizes), top.indices.split(sizes)):
                    e["der_values"], e["der_index"] = v.bfloat16().cpu(), j.cpu()

    def step_loss(self, model):
        return self.args.alpha * self.logit_loss(model, self.sample_memory(self.args.mem_batch_size))

    def logit_loss(self, model, examples):
        device = model.lm_head.weight.device
        b = collate(examples, device=device)
        h = at_targets(model(b["idx"], return_hidden=True), b)  # (N, dim): response positions only
        logits = model.lm_head(h).float()  # (N, vocab)
        if self.args.der_topk <= 0:
            with torch.no_grad(), lora.disabled(model):
                target = model.lm_head(at_targets(model(b["idx"], return_hidden=True), b)).float()
            return F.mse_loss(logits, target)
        index = torch.cat([e["der_index"] for e in examples]).to(device)  # (N, k)
        values = torch.cat([e["der_values"] for e in examples]).to(device).float()
        return F.mse_loss(logits.gather(-1, index), values)
