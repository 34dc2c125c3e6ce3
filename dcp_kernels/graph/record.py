"""Getting a graph of the model: a torch.fx trace with shapes, or a recorded run when fx cannot trace.

:func:`trace` + shape propagation on an example input (eval mode, no statistic moves), or
:func:`record`: forward hooks on leaf modules and a ``TorchFunctionMode`` for the functions between
them build the same kind of fx graph from one real run. Dead-end results are dropped before the
analysis (:func:`drop_dead_ends`).
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .optable import _IN_PLACE_OPERATORS, traced_as_one_call


class _Tracer(fx.Tracer):
    """fx's tracer, plus norm layers however written and registered modules as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return traced_as_one_call(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types; name the model and the cause
        raise TypeError(
            f"convert() could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc})."
        ) from exc
    return fx.GraphModule(model, graph)


class _ShapeMeta:
    """What ``ShapeProp`` would put in ``node.meta["tensor_meta"]``, as far as the analysis reads it."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)


_OPERATOR_METHODS = {
    "__add__": operator.add, "__radd__": operator.add, "__iadd__": operator.iadd,
    "__sub__": operator.sub, "__isub__": operator.isub, "__mul__": operator.mul, "__rmul__": operator.mul,
    "__imul__": operator.imul, "__truediv__": operator.truediv, "__itruediv__": operator.itruediv,
}


def _is_leaf(module: nn.Module) -> bool:
    """torch.fx's default: modules of torch.nn itself are called as a whole, others are entered."""
    if traced_as_one_call(module):
        return True
    return (module.__module__.startswith("torch.nn") or module.__module__.startswith("torch.ao.nn")) and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


@torch.no_grad()
def record(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.Graph:
    """A graph of one run of ``model`` on ``example_inputs``, in the form ``torch.fx`` would trace.

    The fallback for models fx cannot trace: forward hooks on the leaf modules record
    ``call_module`` nodes, a ``TorchFunctionMode`` records the torch functions and tensor methods
    called between them, and every node gets its output shape. Control flow is followed as this
    input takes it. Runs in eval mode (no running statistic moves).
    """
    from torch.overrides import TorchFunctionMode

    graph = fx.Graph()
    nodes: dict[int, fx.Node] = {}
    alive: list[Any] = []  # keep recorded tensors alive so their ids stay unique
    names = {id(m): n for n, m in model.named_modules()}
    params = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    depth = [0]

    def remember(value: Any, node: fx.Node) -> None:
        if isinstance(value, torch.Tensor):
            nodes[id(value)] = node
            alive.append(value)
            node.meta["tensor_meta"] = _ShapeMeta(value.shape)

    def as_arg(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in nodes:
                node = graph.get_attr(params.get(id(value), f"_constant_{len(alive)}"))
                remember(value, node)
            return nodes[id(value)]
        if isinstance(value, (list, tuple)):
            return type(value)(as_arg(v) for v in value)
        if isinstance(value, dict):
            return {k: as_arg(v) for k, v in value.items()}
        return value

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            produces_tensor = isinstance(out, torch.Tensor) or (
                isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out))
            if depth[0] or not produces_tensor:  # inside a leaf module, or a shape/size query
                return out
            name = getattr(func, "__name__", "")
            if name in _OPERATOR_METHODS:
                node = graph.call_function(_OPERATOR_METHODS[name], as_arg(args), as_arg(kwargs))
            elif getattr(func, "__objclass__", None) is torch._C.TensorBase or (
                    name and getattr(torch.Tensor, name, None) is func):
                node = graph.call_method(name, as_arg(args), as_arg(kwargs))
            else:
                node = graph.call_function(func, as_arg(args), as_arg(kwargs))
            if isinstance(out, (tuple, list)):
                for i, item in enumerate(out):
                    remember(item, graph.call_function(operator.getitem, (node, i)))
            remember(out, node)
            return out

    def pre_hook(module, args):
        if depth[0] == 0:
            module.__dict__["_dcp_record_args"] = as_arg(args)
        depth[0] += 1

    def post_hook(module, args, out):
        depth[0] -= 1
        if depth[0] == 0:
            node = graph.call_module(names[id(module)], module.__dict__.pop("_dcp_record_args"))
            remember(out, node)

    handles = []
    for m in model.modules():
        if m is not model and _is_leaf(m) and id(m) in names:
            handles += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(post_hook)]
    try:
        with _eval_mode(model):
            for i, t in enumerate(example_inputs):
                remember(t, graph.placeholder(f"input_{i}"))
            with Recorder():
                out = model(*example_inputs)
        graph.output(as_arg(out))
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.__dict__.pop("_dcp_record_args", None)  # left behind when the forward raised
    return graph


def _example_inputs(model: nn.Module) -> Iterable[tuple[torch.Tensor, ...]]:
    """Guesses at an input when the caller gives none: image batches of common sizes (CIFAR,
    ImageNet, then smaller ones); the first the model accepts wins."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    param = next(model.parameters(), None)
    kwargs = {} if param is None else {"device": param.device, "dtype": param.dtype}
    for size in (32, 224, 64, 28, 16, 8):
        yield (torch.randn(2, channels, size, size, **kwargs),)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no running statistic moves), every module's flag restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@torch.no_grad()
def _first_accepted(model: nn.Module, example_inputs, run: Callable[[tuple], Any]) -> tuple[bool, Any, list[str]]:
    """``run(inputs)`` in eval mode on the caller's example inputs, or on each guess in turn until
    one is accepted: (accepted, its result, the errors of those refused)."""
    candidates = [tuple(example_inputs)] if example_inputs is not None else _example_inputs(model)
    errors = []
    with _eval_mode(model):
        for inputs in candidates:
            try:
                return True, run(inputs), errors
            except Exception as exc:  # the model decides which inputs it accepts
                errors.append(f"{tuple(inputs[0].shape) if inputs else ()}: {type(exc).__name__}: {exc}")
    return False, None, errors


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, example_inputs) -> None:
    """Annotate every node with its output shape: one forward in eval mode (no statistics move)."""
    accepted, _, errors = _first_accepted(model, example_inputs, lambda inputs: ShapeProp(gm).propagate(*inputs))
    if not accepted:
        raise ValueError(
            f"convert() could not run {type(model).__name__} on an example input to learn its tensor shapes "
            f"({'; '.join(errors)}). Pass example_inputs=(a batch the model accepts,)."
        )


def _record_any(model: nn.Module, example_inputs, trace_error: Exception) -> fx.Graph:
    accepted, graph, errors = _first_accepted(model, example_inputs, lambda inputs: record(model, inputs))
    if not accepted:
        raise TypeError(f"{trace_error} A recorded run failed too ({'; '.join(errors)}); pass example_inputs=(a batch "
                        "the model accepts,).") from trace_error
    return graph


def _drop_dead_ends(graph: fx.Graph) -> None:
    """Remove functions and methods whose results nothing uses (e.g. ``float(x.abs().sum())`` in a
    condition): they cannot change the output, so they should not keep channels dense. Module calls
    stay (a conv nobody reads is still a conv of the model), as do in-place ops (their effect is the
    point). Unused calls fx counts as impure (``torch._assert``) go too: they read no channels."""
    def kept(node: fx.Node) -> bool:
        if node.op not in ("call_function", "call_method"):
            return True
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        # add_, relu_, +=, y[...] = ...: writes into a tensor that lives on
        return name.endswith("_") or node.target in _IN_PLACE_OPERATORS or node.target is operator.setitem

    graph.eliminate_dead_code(is_impure_node=kept)


