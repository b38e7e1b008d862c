"""The registry: `--method NAME` picks a class here. A new method is one file and one line below."""
from methods.der import DER
from methods.derpp import DERPP
from methods.replay import Replay
from methods.sft import SFT

METHODS = {m.name: m for m in (SFT, Replay, DER, DERPP)}
