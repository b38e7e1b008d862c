"""Replay / SafeInstr (Bianchi et al. 2024, "Safety-Tuned LLaMAs"): mix safety examples into the user data.

D' = D + a sample of M of size ratio * |D|, shuffled together; then plain SFT on D'. SafeInstr found
that ~3% of safety data recovers most of the safety; the default here is --replay-ratio 0.1.
"""
from methods.method import Method


class Replay(Method):
    name = "replay"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--replay-ratio", type=float, default=0.1,
                            help="safety examples added, as a share of the user's data (default 0.1)")

    def data(self, task, memory):
        if self.args.replay_ratio < 0:
            raise ValueError(f"--replay-ratio must be >= 0, got {self.args.replay_ratio}")
        n = round(self.args.replay_ratio * len(task))
        extra = [memory[self.rng.randrange(len(memory))] for _ in range(n)]  # with replacement: any ratio works, whatever |M|
        return list(task) + extra
