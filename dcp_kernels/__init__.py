"""dcp_kernels: Dynamic Channel Propagation training that skips unselected channels for real."""
from __future__ import annotations

import logging

from .convert import convert
from .graph.optable import register, unregister
from .modules import DCPConv2d
from .ops import backends
from .propagation import DecaySchedule, Propagation

__version__ = "0.1.0"

logging.getLogger("dcp_kernels").addHandler(logging.NullHandler())

__all__ = ["DCPConv2d", "convert", "register", "unregister", "Propagation", "DecaySchedule", "backends", "__version__"]
