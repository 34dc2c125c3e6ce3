"""Host syncs in a steady-state training step, counted on the CPU so they cannot creep back.

On a GPU every op that needs a device value on the host (``.item()``, ``nonzero``, boolean
indexing, ``repeat_interleave`` without ``output_size``, a device-to-host copy) stalls the launch
queue until the device catches up. A ``TorchDispatchMode`` sees every aten op a step runs, on the
CPU as on the GPU, so the count measured here is the count a GPU step would pay. Besides these ops,
the library's single deliberate read (all layers' kept counts, ``dcp_kernels.rule.host_read``) is
counted: at most one per selecting step, none while exploring once every channel is selected.
"""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dcp_kernels
import dcp_kernels.rule
from dcp_kernels.models import resnet_cifar, vgg

torchvision = pytest.importorskip("torchvision")

aten = torch.ops.aten
# Ops whose output shape or value needs the device's data on the host.
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.is_nonzero.default,
    aten.equal.default, aten.bincount.default, aten._unique2.default, aten.unique_consecutive.default,
    aten.unique_dim.default,
}


class SyncCounter(TorchDispatchMode):
    """Counts the sync-like aten ops run under it (name -> count)."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, int] = {}

    def _hit(self, func) -> None:
        name = str(func)
        self.found[name] = self.found.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self._hit(func)
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._hit(func)  # sizes its output from the repeats' sum
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            # Boolean masks as indices run a nonzero inside the op.
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                self._hit(func)
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst_device = args[0].device if func is aten.copy_.default else kwargs.get("device", src.device)
            if src.device.type != "cpu" and torch.device(dst_device).type == "cpu":
                self._hit(func)  # device to host
        return func(*args, **kwargs)


@pytest.fixture
def host_reads(monkeypatch):
    """The number of calls of the library's one deliberate device-to-host read."""
    calls = []
    original = dcp_kernels.rule.host_read

    def counted(t):
        calls.append(t.numel())
        return original(t)

    monkeypatch.setattr(dcp_kernels.rule, "host_read", counted)
    return calls


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _densenet():
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                       num_classes=10)


MODELS = {
    "vgg": lambda: vgg([16, "M", 32, 32, "M", 64, 64], num_classes=10),
    "resnet": lambda: resnet_cifar(8, num_classes=10, width=8),
    "densenet": _densenet,  # concat readers (ConcatSource) and a Linear reader
}


@pytest.mark.parametrize("backend", ["torch", "torch-capacity", "reference"])
@pytest.mark.parametrize("name", list(MODELS))
def test_steady_state_step_has_no_sync_op_and_one_host_read(name, backend, host_reads):
    """``torch-capacity`` (static_shapes=True on torch): the one read decides the capacities too."""
    torch.manual_seed(0)
    model = MODELS[name]()
    capacity = backend == "torch-capacity"
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=1, backend="torch" if capacity else backend,
                               prune_residual=True, static_shapes=capacity)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    _step(model, opt, x, y)  # exploring: every channel selected
    host_reads.clear()
    with SyncCounter() as exploring:
        _step(model, opt, x, y)
    assert exploring.found == {} and host_reads == [], "an exploring step with nothing new to select must not sync"
    prop.epoch_end()
    for _ in range(2):
        _step(model, opt, x, y)
    host_reads.clear()
    with SyncCounter() as selecting:
        _step(model, opt, x, y)
    assert selecting.found == {}, f"sync-like ops in a steady-state {backend} step: {selecting.found}"
    assert len(host_reads) == 1, f"expected one batched read of the kept counts, got {len(host_reads)}"
    assert host_reads[0] == len(prop.groups)  # all groups' counts in that one read
    # The controller kept those counts: reading them for a display costs nothing.
    with SyncCounter() as display:
        kept = prop.kept()
    assert display.found == {} and len(host_reads) == 1
    assert kept == {n: int(layer.selected.sum()) for n, layer in zip(prop.layer_names, prop.layers)}


def test_selection_alone_never_reads_the_device(host_reads):
    model = vgg([16, "M", 32, 32, "M", 64], num_classes=10)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, round_to=4)
    model(torch.randn(2, 3, 16, 16))  # a training forward: selects (and reads the counts once)
    host_reads.clear()
    with SyncCounter() as counter:
        prop._selection_mask()
    assert counter.found == {} and host_reads == []


def test_kept_after_a_manual_selection_reads_once(host_reads):
    model = vgg([16, "M", 32], num_classes=10)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0)
    model.train()
    model(torch.randn(2, 3, 16, 16))
    layer = prop.layers[0]
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:3] = True
    layer.set_selection(mask)  # not the controller's write: its stored counts no longer hold
    host_reads.clear()
    assert prop.kept()[prop.layer_names[0]] == 3
    assert len(host_reads) == 1
    assert layer.selected_indices().tolist() == [0, 1, 2]


# Ops that only reinterpret a tensor's metadata: no kernel launch on a GPU.
METADATA_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.alias.default, aten.detach.default, aten.t.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor, aten.select.int,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.as_strided.default, aten.reshape.default,
    aten.split_with_sizes.default, aten.split.Tensor, aten.unbind.int,
}


# Ops that launch no kernel on a GPU although they make a tensor: allocations (the caching allocator
# hands out memory without a kernel) and the profiler's markers.
NO_KERNEL_OPS = {
    aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default, aten.empty_strided.default,
    aten.new_empty_strided.default, torch.ops.profiler._record_function_enter_new.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
}


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops that would launch a kernel on a GPU (everything but metadata-only ops and
    allocations), by op (``ops``) for the failure messages."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in METADATA_OPS and func not in NO_KERNEL_OPS:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD as a GPU run gets it: ``foreach=True`` is what ``torch.optim`` picks for CUDA parameters
    (a few multi-tensor kernels per step); the CPU's per-parameter default would add about 3 ops per
    parameter to both sides of every ratio below and flatter DCP's."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)


def _launches(model, prop=None, batch=4, size=16) -> LaunchCounter:
    opt = _optimizer(model)
    model.train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    _step(model, opt, x, y)
    if prop is not None:
        prop.epoch_end()
    _step(model, opt, x, y)
    _step(model, opt, x, y)
    with LaunchCounter() as counter:
        _step(model, opt, x, y)
    return counter


def _excess(dcp: LaunchCounter, dense: LaunchCounter) -> str:
    """The ops DCP launches more often than dense, most first (for a failure message)."""
    return ", ".join(f"{op} +{n}" for op, n in (dcp.ops - dense.ops).most_common(12))


# The bounds leave about 7-10 ops of room: which layers keep every channel (and skip their gathers)
# depends on the selection, which rounding on another CPU may move.
@pytest.mark.parametrize("name, bound", [("test-vgg", 3.4), ("vgg16", 3.45), ("test-vgg-capacity", 4.05),
                                         ("vgg16-capacity", 4.2)])
def test_launches_per_step_stay_bounded(name, bound):
    """A GPU step at CIFAR size is launch-bound: every extra op per layer costs about as much as the
    convolution (docs/benchmarks-gpu.md). Counted as a GPU launches them: allocations are not launches,
    and SGD runs ``foreach`` as it does on CUDA. Steady state, ``torch`` backend (2026-12-03):
    VGG-16 (width 0.25, batch 8, 32 px; 13 prunable layers) 377 ops vs dense's 116 (3.25x); the test
    VGG (5 prunable layers) 175 vs 54 (3.24x). The utility is reduced from ``g * y`` and ``g``: more
    small ops than recomputing BN's output, but fewer activation-size passes (a GPU step at ImageNet
    size is memory-bound); on CUDA ``sum_hw g * y`` is one batched dot product, on the CPU (counted
    here) the product and its sum, one op per layer more (2026-12-08: VGG-16 391 ops, 3.37x; capacity
    478, 4.12x). What the ``torch`` backend adds per layer
    is listed in docs/benchmarks-gpu.md (about 15 ops); the static Triton step is the path with few
    launches (test_triton_launches_per_step_stay_bounded).

    ``-capacity``: capacity widths (``static_shapes=True``), a step meant to be captured in a CUDA
    graph (one launch per replay): 464 (4.00x) on VGG-16, 208 (3.85x) on the test VGG. About 7 ops per
    layer more than the exact step: the padding's weight columns zeroed (forward and gradient), the BN
    affine of padding slots zeroed (and its gradient), the running statistics kept (a copy and a select).
    The bounds keep the counts from creeping back up."""
    make, batch, size = MODELS["vgg"], 4, 16
    capacity = name.endswith("-capacity")
    if name.startswith("vgg16"):
        make, batch, size = (lambda: vgg("vgg16", width=0.25)), 8, 32
    torch.manual_seed(0)
    dense = make()
    converted = make()
    converted.load_state_dict(dense.state_dict())
    prop = dcp_kernels.convert(converted, 0.5, explore_epochs=1, backend="torch", static_shapes=capacity)
    dense_ops, dcp_ops = _launches(dense, batch=batch, size=size), _launches(converted, prop, batch=batch, size=size)
    assert dcp_ops.count <= bound * dense_ops.count, (
        f"{dcp_ops.count} ops per DCP step vs {dense_ops.count} dense ({dcp_ops.count / dense_ops.count:.2f}x); "
        f"more than dense: {_excess(dcp_ops, dense_ops)}")


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps from the forward for the backward, the model's
    parameters left out (they stay in memory anyway; a conv saving its weight costs nothing)."""
    storages: dict[int, int] = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("prune", [0.3, 0.5, 0.7])
def test_saved_activations_near_the_finalized_network(prune):
    """What a training step keeps for backward, counted exactly (bytes of saved storages other than
    the parameters): the fused BN + gate saves the conv output and the batch statistics only, and a
    gathered weight block is saved only where it is smaller than the layer's input (elsewhere
    backward gathers it again), so DCP keeps about what the finalized network of the same widths
    keeps. VGG-16 at width 0.25, batch 16, 32 px (the activation-to-weight proportion of the full
    VGG-16 at batch 64, whose figures are the same within 0.01x): 1.03x / 1.02x / 1.01x the finalized
    network at prune 0.3 / 0.5 / 0.7 (2026-11-28). Dense keeps 10.6 MB, DCP 9.3 / 7.9 / 5.6 MB."""
    torch.manual_seed(0)
    dense = vgg("vgg16", width=0.25)
    model = vgg("vgg16", width=0.25)
    model.load_state_dict(dense.state_dict())
    prop = dcp_kernels.convert(model, prune, explore_epochs=1, backend="torch")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        _step(model, opt, x, y)
        if step == 0:
            prop.epoch_end()
    dcp_bytes = _saved_bytes(model, x)  # this forward selects; the finalized net has its widths
    ideal_bytes = _saved_bytes(prop.finalize(), x)
    assert dcp_bytes <= 1.06 * ideal_bytes, f"DCP keeps {dcp_bytes / ideal_bytes:.2f}x the finalized network"
    assert dcp_bytes < _saved_bytes(dense, x)


@pytest.mark.skipif(not dcp_kernels.ops.backends("cpu")["triton"], reason="needs Triton (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("static_shapes, bound", [(False, 2.9), (True, 2.0)], ids=["compact", "static-shapes"])
def test_triton_launches_per_step_stay_bounded(monkeypatch, static_shapes, bound):
    """The Triton backend's launches per steady-state step, counted at the launch sites: the aten ops
    of the step and of the custom ops' own code (zero fills, split-K sums) plus every Triton kernel
    launch (counted in the wrappers that launch them; the interpreter's own tensor work is not a
    GPU launch and is not counted). Counted as in test_launches_per_step_stay_bounded (allocations
    are not launches, SGD ``foreach``), on the test VGG against dense's 54 (2026-12-03): compact
    shapes 124 aten ops + 24 kernels = 148 (2.74x); **static shapes 69 + 34 = 103
    (1.91x)**: per prunable layer **7 kernels** (a conv kernel, BN statistics and BN apply + gate
    forward; the BN backward reduction, which also writes the utility into the network-wide update
    of ``rule.UtilityUpdates``, the BN backward apply, grad-input and grad-weight; the first layer
    needs no grad-input: 34 for 5 layers) where dense launches at least 7 (docs/benchmarks-gpu.md),
    plus the per-step selection and the one utility update for all layers."""
    from torch.utils._python_dispatch import _disable_current_modes

    import dcp_kernels.ops.triton as triton_backend
    from dcp_kernels.ops.triton import (
        batch_norm,
        depthwise,
        forward,
        grad_input,
        grad_weight,
        utility,
    )

    kernels = []

    def counting_wrap(kernel):
        wrapped = torch.library.wrap_triton(kernel)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    kernels.append(kernel)
                    with _disable_current_modes():  # the interpreter's tensor work is not a launch
                        return wrapped[grid](*args, **kwargs)
                return launch

        return Launcher()

    for module in (batch_norm, depthwise, forward, grad_input, grad_weight, utility):
        monkeypatch.setattr(module, "wrap_triton", counting_wrap)

    class SiteCounter(LaunchCounter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "dcp_triton":  # count inside: the op's own allocations and kernels
                implementation = getattr(triton_backend, "_" + func._schema.name.split("::")[1])
                with self:
                    return implementation(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    torch.manual_seed(0)
    dense = MODELS["vgg"]()
    converted = MODELS["vgg"]()
    converted.load_state_dict(dense.state_dict())
    prop = dcp_kernels.convert(converted, 0.5, explore_epochs=1, backend="triton", static_shapes=static_shapes)
    dense_ops = _launches(dense)
    opt = _optimizer(converted)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for step in range(3):
        _step(converted, opt, x, y)
        if step == 0:
            prop.epoch_end()
    kernels.clear()
    with SiteCounter() as counter:
        _step(converted, opt, x, y)
    total = counter.count + len(kernels)
    assert len(kernels) >= 5 * 4, "every layer launches its forward, gradient and utility kernels"
    if static_shapes:  # conv, BN statistics, BN apply; BN backward reduce (+ utility), apply; grad-input, -weight
        assert len(kernels) <= 7 * 5, f"{len(kernels)} Triton kernels for 5 prunable layers"
    assert total <= bound * dense_ops.count, (
        f"{total} launches per Triton step vs {dense_ops.count} dense ({total / dense_ops.count:.2f}x); "
        f"aten ops more than dense: {_excess(counter, dense_ops)}")
