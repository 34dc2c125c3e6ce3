"""How ``dcp-train`` stops on purpose: each is reported in one line, without a traceback."""
from __future__ import annotations


class UsageError(SystemExit):
    """A mistake in the command line or in the files it names (exit status 2).

    A ``SystemExit``, so code calling :func:`dcp_kernels.train.cli.run` directly also ends without a
    traceback."""


class Diverged(SystemExit):
    """The loss stopped being finite (exit status 1); the checkpoint on disk is the last good one."""
