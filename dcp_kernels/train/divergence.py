"""Non-finite losses, watched on the device: a diverging run stops at the next check, not at its end.

The loss is checked where ``dcp-train`` reads the device anyway or rarely (every ``DISPLAY_EVERY``
steps, before each checkpoint, at each epoch end): reading it every step would sync every step.
Without a GradScaler one non-finite loss is divergence (its gradients reach the weights). With
fp16's GradScaler a non-finite loss skips its step and the scale backs off; only a loss non-finite
on ``FP16_PATIENCE`` steps in a row (the scale then 2**20 times smaller, the weights unchanged all
along) is divergence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_PATIENCE = 20


@dataclass
class Verdict:
    """What a check found: the longest run of non-finite losses since the last check and the step
    (in the epoch, from 1) where the first of them came (``None``: none); ``weights``: the weights or
    BatchNorm statistics themselves are not finite."""

    longest: int
    first_step: int | None
    weights: bool = False


# The first bad step travels as FIRST_KEY - step (0: none), so that a MAX all-reduce over the ranks
# gives the earliest step (and, element by element, the longest run: possibly another rank's).
FIRST_KEY = 1 << 40


class LossWatch:
    """Counts non-finite losses on the device: consecutive ones, the longest such run and the step
    of the first since the last check (a few tiny device ops per step, no host read)."""

    def __init__(self, device: torch.device, patience: int) -> None:
        self.patience = patience
        self._run = torch.zeros((), dtype=torch.int64, device=device)
        self._longest = torch.zeros((), dtype=torch.int64, device=device)
        self._first = torch.full((), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._run = torch.where(bad, self._run + 1, 0)
        self._longest = torch.maximum(self._longest, self._run)
        self._first = torch.where(bad & (self._first < 0), step, self._first)

    def counts(self) -> torch.Tensor:
        """(longest, first-step key) as one int64 device tensor, to read (or MAX all-reduce) in one go."""
        return torch.stack([self._longest, torch.where(self._first >= 0, FIRST_KEY - self._first, 0)])

    def take_verdict(self, counts: list[int]) -> Verdict | None:
        """Divergence when the longest run reached the patience; resets the counts since the check."""
        longest, first_key = counts
        self._longest.zero_()
        self._first.fill_(-1)
        if longest >= self.patience:
            return Verdict(longest, FIRST_KEY - first_key if first_key else None)
        return None
