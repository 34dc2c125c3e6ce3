"""The channel dependency graph: which conv output channels can be pruned, and who reads them.

* :mod:`.record`: a graph of the model (torch.fx trace with shapes, or a recorded run);
* :mod:`.optable`: what each operation does to channels (the tables);
* :mod:`.analysis`: channel spaces, coupled groups, readers and concat segments (:func:`analyze`).

Rules in full: docs/convert.md.
"""
from .analysis import ChannelAnalysis, Group, Segment, analyze
from .optable import supported_conv
from .record import record, trace

__all__ = ["ChannelAnalysis", "Group", "Segment", "analyze", "record", "supported_conv", "trace"]
