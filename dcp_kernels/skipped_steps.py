"""Skipped optimizer steps: a step whose optimizer update does not happen leaves the utilities alone.

``torch.amp.GradScaler`` skips ``optimizer.step()`` when the scaled gradients hold inf/NaN (several
steps at the start of every fp16 run while its scale settles, and after any overflow). The utility
update of such a step would still run at the end of its backward pass, measured on non-finite
gradients (``nan_to_num`` makes them 0: the selected channels decay with nothing added). So the
controller remembers the utilities at the start of every step (after its selection: one
multi-tensor copy) and puts them back when the step turns out skipped:

* with a registered scaler (:meth:`SkippedSteps.use_grad_scaler`) the decision is GradScaler's own:
  its scale went down at ``scaler.update()`` exactly when it found inf/NaN and skipped the step. The
  comparison and the restore run on the device (no host read); they run at the next selection, at
  ``model.state_dict()`` and at :meth:`Propagation.state_dict` (a checkpoint written after
  ``scaler.update()`` holds the restored utilities). Read as a skip too: a scale lowered by hand
  (``update(new_scale=...)``), and one scaler shared with other optimizers that skipped. Missed: skips
  after the scale underflowed to 0;
* a loop that skips a step on its own criterion calls :meth:`SkippedSteps.skip` (``prop.skip_step()``).

Loading state (``model.load_state_dict``, :meth:`Propagation.load_state_dict`) forgets the step under
way: nothing loaded is ever put back to an older snapshot.

PyTorch offers no hook on GradScaler's decision (an optimizer's step hooks run only when it steps,
and a loop that uses no ``torch.optim`` optimizer cannot be told from one that skipped), hence the one
registration call. Under DDP every rank's scaler decides alike (the gradients it checks are all-reduced),
so the ranks restore alike before the utilities are averaged.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .rule import utility_updates_paused


class SkippedSteps:
    """The utilities at the start of the step under way, and whether that step was skipped.

    ``layers``: the controller's prunable layers (anything with a ``utility`` buffer)."""

    def __init__(self, layers: Sequence[Any]) -> None:
        self.layers = list(layers)
        self.scaler: torch.amp.GradScaler | None = None
        self._start: list[torch.Tensor] | None = None  # utilities when the step under way began
        self._scale_at_start: torch.Tensor | float | None = None  # the scaler's scale then

    def __getstate__(self) -> dict:
        # The copies and the scaler are per run: a pickled model (torch.save(model)) carries neither.
        return {"layers": self.layers, "scaler": None, "_start": None, "_scale_at_start": None}

    def use_grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Follow ``scaler``'s decisions (None: stop following one)."""
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"use_grad_scaler expects a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self._scale_at_start = None

    def forget(self) -> None:
        """Drop the step under way's snapshot (state was loaded: nothing may be put back over it)."""
        self._start = None
        self._scale_at_start = None

    def _scale(self) -> torch.Tensor | float | None:
        """The scaler's current scale, without a host read (its initial value before its first use);
        None when no enabled scaler is followed."""
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        scale = getattr(self.scaler, "_scale", None)  # created on the scaler's first scale() call
        return float(self.scaler._init_scale) if scale is None else scale

    @torch.no_grad()
    def snapshot(self) -> None:
        """A step begins (after its selection): remember the utilities and the scaler's scale."""
        utilities = [layer.utility for layer in self.layers]
        if self._start is None or any(a.device != u.device or a.dtype != u.dtype for a, u in zip(self._start, utilities)):
            self._start = [torch.empty_like(u) for u in utilities]
        torch._foreach_copy_(self._start, utilities)
        scale = self._scale()
        self._scale_at_start = scale.clone() if isinstance(scale, torch.Tensor) else scale

    @torch.no_grad()
    def restore_if_skipped(self) -> None:
        """Apply the followed scaler's decision on the step under way: its utilities go back to those at
        its start when the scaler's scale went down since (it skipped the step). Decided on the
        device; calling it again, or before ``scaler.update()`` (nothing decided yet), is harmless.
        Not inside :func:`~dcp_kernels.rule.paused_utility_updates` (``prop.no_utility_updates()``),
        which promises no write to the utilities."""
        scale = self._scale()  # a float: the scaler has not scaled anything yet, so nothing was skipped
        if (self._start is None or not isinstance(scale, torch.Tensor) or self._scale_at_start is None
                or utility_updates_paused()):
            return
        skipped = (scale < self._scale_at_start).to(torch.float32)
        utilities = [layer.utility for layer in self.layers]
        # u * (1 - s) + start * s: exact for s in {0, 1} (utilities are finite), one multi-tensor
        # launch each, where a torch.where per layer would be one launch per layer.
        torch._foreach_mul_(utilities, 1.0 - skipped)
        torch._foreach_add_(utilities, torch._foreach_mul(self._start, skipped))

    @torch.no_grad()
    def skip(self) -> None:
        """The step under way did not happen: its utilities go back to those at its start (the caller
        first applies the updates an aborted backward left pending, so that they are undone too)."""
        if self._start is None:
            raise RuntimeError("skip_step(): no step is under way (a step begins at its selection, before the "
                               "training forward; loading state ends it)")
        torch._foreach_copy_([layer.utility for layer in self.layers], self._start)
