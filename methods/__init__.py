"""The registry: `--method NAME` picks a class here. A new method is one file and one line below."""
from methods.agem import AGEM
from methods.csft import CSFT
from methods.der import DER
from methods.derpp import DERPP
from methods.ewc import EWC
from methods.l2 import L2
from methods.lisa import Lisa
from methods.lwf import LwF
from methods.magmax import MagMax
from methods.refresh import Refresh
from methods.replay import Replay
from methods.safelora import SafeLoRA
from methods.sft import SFT

METHODS = {m.name: m for m in (SFT, Replay, DER, DERPP, L2, EWC, LwF, AGEM, Refresh, MagMax, Lisa, SafeLoRA, CSFT)}


def inner_choices():
    """The methods another one (refresh) may run around: any that runs around none itself."""
    return [n for n, m in METHODS.items() if m.inner_flag is None]


def make(name, args):
    """The method `name` from its flags in args; one that runs around another (refresh) gets it built too."""
    cls = METHODS[name]
    if cls.inner_flag is None:
        return cls(args)
    inner = getattr(args, cls.inner_flag)
    if inner not in inner_choices():
        raise ValueError(f"--{cls.inner_flag.replace('_', '-')} {inner!r}: {name} runs around one of {', '.join(inner_choices())}")
    return cls(args, make(inner, args))
