"""Pruning methods. Each is a small serializable object; see `tfprune.methods.base`."""

from tfprune.methods.base import MaskedMethod, Method, get
from tfprune.methods.dpp import DPP
from tfprune.methods.follow import Follow
from tfprune.methods.magnitude import Magnitude
from tfprune.methods.taylor import Taylor
from tfprune.methods.turbo_vbi import TurboVBI

BY_NAME = {"dpp": DPP, "magnitude": Magnitude, "taylor": Taylor,
           "turbo_vbi": TurboVBI}

__all__ = ["DPP", "Method", "MaskedMethod", "Magnitude", "Follow", "Taylor", "TurboVBI", "get"]
