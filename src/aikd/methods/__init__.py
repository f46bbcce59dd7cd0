"""Training methods, one file each; importing this package registers them all."""

from aikd.methods import aekt, aikd, amkd, bss, ce, cskd, dkd, kd, pskd, tfkd
from aikd.methods.base import METHODS, Batch, Method, MethodContext, StepOutput, register_method

__all__ = [
    "METHODS", "Batch", "Method", "MethodContext", "StepOutput", "aekt", "aikd", "amkd", "bss", "ce", "cskd",
    "dkd", "kd", "pskd", "register_method", "tfkd",
]
