"""A whole DCP training step captured in a CUDA graph and replayed.

On a GPU a DCP step at CIFAR-to-ImageNet sizes is host-bound: Python, autograd and kernel launches
for every layer cost more than the kernels (docs/benchmarks-gpu.md). A CUDA graph records the step's
kernels once and replays them with one launch. That needs a step whose launches and shapes do not
change from step to step: a model converted with ``static_shapes=True``.

* ``backend="torch"`` (capacity widths, docs/algorithm.md): the selection runs eagerly before each
  call (its one host read, the kept counts, decides the capacities) and writes every layer's slot
  vectors in place; forward, backward, utility update and optimizer step are captured. A capacity
  change (rare: growth on overflow, fitting at epoch ends) is a new capture.
* ``backend="triton"`` (full width): the selection itself is captured too (it reads nothing back).

:class:`GraphedStep` wraps a user's step function::

    prop = dcp_kernels.convert(model, 0.5, backend="torch", static_shapes=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_step(x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss, logits

    step = GraphedStep(train_step, model, prop, opt)
    for x, y in loader:
        loss, logits = step(x, y)  # eager for the first steps, then captured once and replayed

The first ``warmup`` calls run eagerly (Triton autotuning, optimizer state, the selection rule's
constants); the next call captures the step and replays it; later calls replay it. What a graph
holds as constants is checked before every call: the epoch (exploration ending, the utility decay
schedule), the optimizer's hyperparameters (learning rate, momentum, weight decay, ...), the
BatchNorms' momenta and, under capacity widths, the capacities. A capture happens only in the
setting of the eager step just before it, so every shape it records has run eagerly first (cuDNN
has planned it; a plan search inside a capture would fail); when the setting changes, the next call
runs eagerly and the one after captures. A batch of another shape (an epoch's short last batch)
runs eagerly. Every call
trains on its own batch exactly once: the results equal eager training (tests/test_static_shapes.py
and tests/test_capacity.py, on a GPU; their bookkeeping with a stand-in graph on the CPU).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .propagation import Propagation


class GraphedStep:
    """Run ``step_fn(*batch)`` (forward, loss, backward, ``optimizer.step()``; no ``zero_grad``) as a
    replayed CUDA graph. Returns ``step_fn``'s tensors: on replays, static tensors that the next call
    overwrites (clone what you keep).

    Args:
        step_fn: the training step; it must not read device values on the host (no ``.item()``).
        model: the converted model (its BatchNorms are checked for graph-safe settings).
        prop: its controller, converted with ``static_shapes=True`` and selecting automatically.
        optimizer: the optimizer ``step_fn`` steps (its gradients are reset here, set to None
            before each eager step and before a capture). Adam-style optimizers need
            ``capturable=True``.
        warmup: eager calls before the first capture (at least 1).
    """

    def __init__(self, step_fn: Callable[..., Any], model: nn.Module, prop: Propagation,
                 optimizer: torch.optim.Optimizer, *, warmup: int = 3) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs a CUDA device (CUDA graphs); run the step eagerly on this machine")
        if not prop.static_shapes:
            raise ValueError("GraphedStep needs a model converted with static_shapes=True (backend 'torch' or 'triton')")
        if not prop.auto_select:
            raise ValueError("GraphedStep needs prop.auto_select=True: it selects before every step")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        named_norms = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        norms = [m for _, m in named_norms]
        cumulative = [name for name, m in named_norms if m.momentum is None and m.track_running_stats]
        if cumulative:
            raise ValueError(f"GraphedStep: BatchNorm momentum=None (cumulative average) reads the batch count on the "
                             f"host every step ({', '.join(cumulative[:3])}); set a float momentum")
        self.step_fn, self.model, self.prop, self.optimizer = step_fn, model, prop, optimizer
        prop.slots_in_place = True  # capacity widths: a graph reads the slot vectors it was captured with
        self.warmup = warmup
        self.captures = 0  # how many times the step was captured (tests, logs)
        self.replays = 0
        self._eager_left = warmup
        self._norms = norms
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None
        self._eager_key: tuple | None = None  # constants and batch shapes of the last eager step
        self._changes_in_a_row = 0  # eager calls in a row because the setting changed (never captured)
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._outputs: Any = None
        self._stream = torch.cuda.Stream()

    def _constants(self) -> tuple:
        """What a captured graph holds as constants: a change needs a new capture. The optimizer's
        hyperparameters and the BatchNorms' momenta are kernel arguments; under capacity widths the
        capacities are shapes (a new one reallocates that group's slot vectors). A hyperparameter
        tensor on the CPU is read into a kernel argument too (SGD's ``lr``), so it counts by value;
        one on the GPU (``capturable=True`` optimizers) is read by the graph from its storage."""
        capacities = tuple(self.prop.capacities().values()) if self.prop.capacity else ()

        def value(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.item() if v.device.type == "cpu" and v.numel() == 1 else None
            return v

        # Sorted by key (unique), so values are compared, never ordered.
        hyper = tuple(tuple(sorted((k, value(v)) for k, v in g.items() if k != "params"))
                      for g in self.optimizer.param_groups)
        return (self.prop.epoch, self.prop.exploring, hyper, tuple(m.momentum for m in self._norms), capacities)

    def _run(self, batch: Sequence[torch.Tensor]) -> Any:
        """``step_fn(*batch)``; under capacity widths with the selection hook not selecting (the
        selection ran eagerly before, see __call__)."""
        if not self.prop.capacity:
            return self.step_fn(*batch)
        self.prop.auto_select = False
        try:
            return self.step_fn(*batch)
        finally:
            self.prop.auto_select = True

    @staticmethod
    def _shapes(batch: Sequence[torch.Tensor]) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in batch)

    def _eager(self, batch: Sequence[torch.Tensor]) -> Any:
        # On a side stream, as a capture runs (CUDA graph warm-up practice: lazy handles and
        # workspaces get created on the stream the capture will use).
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self.optimizer.zero_grad(set_to_none=True)
            out = self._run(batch)
        torch.cuda.current_stream().wait_stream(self._stream)
        return out

    def _capture(self, batch: Sequence[torch.Tensor], key: tuple) -> None:
        self._graph = None  # release the previous graph's memory pool first
        self._inputs = tuple(t.clone() for t in batch)
        self.optimizer.zero_grad(set_to_none=True)  # gradients get allocated inside the graph's pool
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        steps_before = self.prop.steps
        with torch.cuda.graph(graph, stream=self._stream):
            self._outputs = self._run(self._inputs)
        # Capturing records the kernels without running them; the controller's Python step counter
        # moved once: undo it, the replay below counts the step.
        self.prop.steps = steps_before
        self._graph, self._key = graph, key
        self.captures += 1

    def _note_setting_change(self) -> None:
        """Warn once when the setting changes on every call, so nothing is ever captured (a learning
        rate or momentum schedule stepped per iteration)."""
        self._changes_in_a_row += 1
        if self._changes_in_a_row == 3:
            warnings.warn("GraphedStep: the step's constants (learning rate, momentum, weight decay, BatchNorm "
                          "momentum or capacities) changed on 3 calls in a row, so it runs eagerly: step a per-"
                          "iteration schedule per epoch, or use a tensor learning rate on the GPU with "
                          "capturable=True", stacklevel=3)

    def __call__(self, *batch: torch.Tensor) -> Any:
        if self.prop.capacity:
            # The selection, eagerly, on the stream replays run on (ordered after the previous step,
            # before the next): its host read decides the capacities, and it writes the slot vectors
            # the captured step reads in place (their storage holds while a capacity does).
            self.prop.step()
            self.prop.refresh_indices()
        key = (self._constants(), self._shapes(batch))
        if self._key is not None and self._key[0] != key[0]:
            self._graph, self._key = None, None
        if self._eager_left > 0 or (self._graph is None and key != self._eager_key):
            # Warm-up, or a setting (or batch shape) no eager step has run in yet: capacities that
            # grew since the last eager step, a new learning rate. Run it eagerly before capturing it.
            if self._eager_left == 0:
                self._note_setting_change()
            self._eager_left = max(0, self._eager_left - 1)
            self._eager_key = key
            return self._eager(batch)
        self._changes_in_a_row = 0
        if self._graph is None:
            self._capture(batch, key)
        elif self._key[1] != key[1]:
            return self._eager(batch)  # e.g. an epoch's short last batch
        for static, fresh in zip(self._inputs, batch):
            static.copy_(fresh, non_blocking=True)
        self._graph.replay()
        if not self.prop.capacity:
            self.prop.steps += 1  # what the selection hook's step() counts in an eager step
        self.replays += 1
        return self._outputs
