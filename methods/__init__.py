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
