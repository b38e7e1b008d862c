"""DER++ (Buzzega et al., NeurIPS 2020): DER plus replay of the memory's own labels.

    L = l(D) + alpha * || h_theta(x_m) - z_m ||^2 + beta * l(x_m', y_m')     (alpha 0.5, beta 0.5)

x_m and x_m' are two independent memory batches; y_m' are the refusals themselves. Flags as der.py.
"""
from batches import collate
from methods.der import DER
from methods.method import nll


class DERPP(DER):
    name = "derpp"

    @staticmethod
    def add_args(parser):
        DER.add_args(parser)
        parser.add_argument("--beta", type=float, default=0.5, help="weight of the memory's label loss (default 0.5)")

    def step_loss(self, model):
        loss = super().step_loss(model)
        b = collate(self.sample_memory(self.args.mem_batch_size), device=model.lm_head.weight.device)
        return loss + self.args.beta * nll(model, b)
