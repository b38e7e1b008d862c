"""SFT: plain fine-tuning on the user's data, min l(D). The reference every other method is compared with."""
from methods.method import Method


class SFT(Method):
    name = "sft"
