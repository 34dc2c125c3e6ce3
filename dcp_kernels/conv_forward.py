"""Convs that are ``nn.Conv2d`` subclasses with their own ``forward``.

Zoos write convs that transform their weight (weight standardization: timm ``StdConv2d`` and
``ScaledStdConv2d``, ``transformers``' BiT ``WeightStandardizedConv2d``) or pad their input at run
time (TensorFlow's 'SAME': timm ``Conv2dSame``, ``DynamicPad2d``) before one ``F.conv2d``.
:class:`OwnForward` runs such a module's own ``forward`` up to that call and takes its operands
(the padded input, the transformed weight and bias, the padding), so DCP convolves exactly what the
module would, with channels skipped:

- A weight transform is applied to the **full** weight, then the kept block is gathered: equal to
  the masked reference, which convolves the full transformed weight with zeroed channels.
- Input padding is channel-wise, so it runs on compact inputs as well.

:func:`conv_refusal` checks once per module, on a probe input, that the module is of that form: one
``conv2d`` whose result is what ``forward`` returns, an input reached only through padding, the
module's own stride, dilation and groups. Anything else keeps the conv dense with the reason, as do
parametrized convs and subclasses holding tensors DCP does not know.

The original module is kept, hidden, by the layer that takes its place: each call points its tensors
at the layer's (:func:`point_at`), so after ``convert()`` the original object holds the layer's tensors.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_CONV2D = {F.conv2d, torch.conv2d}
# What a forward may do to its input before the conv: padding is channel-wise.
_INPUT_OPS = {F.pad, torch.constant_pad_nd}


class ConvForm(NamedTuple):
    """What a conv subclass's own forward does around its conv2d call."""

    transforms_weight: bool  # convolves a weight (or bias) computed from its parameters
    pads_input: bool  # pads its input first


# One verdict per module and question (the analysis, the conversion and finalize all ask): a probe
# runs the module's own forward, which should not run more often than needed.
_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def cached_verdict(module: nn.Module, key: Any, judge: Callable[[], Any]) -> Any:
    """``judge()``'s answer about ``module`` for question ``key``, computed once per module."""
    verdicts = _VERDICTS.setdefault(module, {})
    if key not in verdicts:
        verdicts[key] = judge()
    return verdicts[key]


def name_clash(module: nn.Module, layer: nn.Module) -> str | None:
    """Why ``module``'s tensors and children cannot be registered on ``layer`` (a DCP layer that takes
    its place, made on the meta device) under their own names: one of them is a name it uses."""
    own = (set(module._parameters) | set(module._buffers) | set(module._modules)) - {"weight", "bias"}
    used = set(vars(layer)) | set(layer._parameters) | set(layer._buffers) | set(layer._modules) | set(dir(type(layer)))
    clash = sorted(own & used)
    return None if not clash else (f"{type(module).__name__} has its own tensor or module {clash[0]!r}, a name "
                                   f"{type(layer).__name__} uses")


class ConvCall(NamedTuple):
    """The operands of the one ``F.conv2d`` a module's forward makes."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: Any
    padding: Any
    dilation: Any
    groups: int


class _Reached(BaseException):
    """Raised at the conv to stop the forward there (a BaseException: a forward's ``except
    Exception`` does not swallow it)."""

    def __init__(self, call: ConvCall) -> None:
        self.call = call


def _call_of(args: tuple, kwargs: dict) -> ConvCall:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    values = dict(zip(names, args))
    values.update(kwargs)
    return ConvCall(**{n: values.get(n, defaults.get(n)) for n in names})


class _StopAtConv(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV2D:
            raise _Reached(_call_of(args, kwargs))
        return func(*args, **kwargs)


class _Probe(TorchFunctionMode):
    """Records, on a probe input, what the forward does to its input and to the conv's result."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.from_input = {id(x)}
        self.alive = [x]  # ids stay unique while the probe runs
        self.calls: list[tuple[ConvCall, torch.Tensor]] = []
        self.after_conv: set[int] = set()
        self.problem: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        reads_input = any(id(t) in self.from_input for t in tensors)
        name = getattr(func, "__name__", repr(func))
        if func in _CONV2D:
            self.calls.append((_call_of(args, kwargs), out))
            self.alive.append(out)
            self.after_conv.add(id(out))
        elif isinstance(out, torch.Tensor):
            if any(id(t) in self.after_conv for t in tensors) and self.problem is None:
                self.problem = f"its forward applies {name} to the conv's output"
            elif reads_input and func in _INPUT_OPS:
                self.from_input.add(id(out))
                self.alive.append(out)
            elif reads_input and self.problem is None:
                self.problem = f"its forward applies {name} to its input before the conv (only padding is understood)"
        return out


def has_own_forward(conv: nn.Conv2d) -> bool:
    """An ``nn.Conv2d`` subclass whose forward is not ``nn.Conv2d``'s."""
    cls = type(conv)
    return cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward


def _probe_input(conv: nn.Conv2d) -> torch.Tensor:
    size = [max(8, d * (k - 1) + 1 + s) for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation)]
    return torch.randn(1, conv.in_channels, *size, device=conv.weight.device, dtype=conv.weight.dtype)


def conv_refusal(conv: nn.Conv2d) -> str | None:
    """Why ``DCPConv2d`` cannot stand in for this conv (None: it can): a plain ``nn.Conv2d``, a
    subclass that keeps its forward and holds nothing more, or a subclass whose own forward is
    padding and a weight transform around one conv2d (:func:`conv_form`). Decided once per module."""
    if type(conv) is nn.Conv2d:
        return None
    verdict = cached_verdict(conv, "conv", lambda: _judge(conv))
    return verdict if isinstance(verdict, str) else None


def conv_form(conv: nn.Conv2d) -> ConvForm:
    """What the accepted subclass ``conv``'s own forward does (:func:`conv_refusal` must be None)."""
    verdict = ConvForm(False, False) if type(conv) is nn.Conv2d else cached_verdict(conv, "conv", lambda: _judge(conv))
    if isinstance(verdict, str):
        raise TypeError(verdict)
    return verdict


def _judge(conv: nn.Conv2d) -> str | ConvForm:
    label = type(conv).__name__
    if torch.nn.utils.parametrize.is_parametrized(conv):
        names = ", ".join(conv.parametrizations.keys())
        return f"{label}: its {names} is parametrized (weight_norm, spectral_norm, ...), which DCP does not cut"
    from .modules import DCPConv2d  # the layer that takes the subclass's place

    clash = name_clash(conv, DCPConv2d(1, 1, 1, device="meta"))
    if clash:
        return clash
    own = set(conv._parameters) | set(conv._buffers) | set(conv._modules)
    if not has_own_forward(conv):
        extra = sorted(own - {"weight", "bias"})
        if extra:
            return f"{label} holds {', '.join(extra)} beside nn.Conv2d's tensors; DCP does not know what they are for"
        return ConvForm(False, False)
    return _probe(conv)


@torch.no_grad()
def _probe(conv: nn.Conv2d) -> str | ConvForm:
    """Run the subclass's own forward once on a probe input: why DCP cannot run it with channels
    skipped, or what it does around its conv2d call."""
    label = type(conv).__name__
    x = _probe_input(conv)
    probe = _Probe(x)
    try:
        with probe:
            out = conv(x)
    except Exception as exc:  # the module's own code: name it, keep the conv dense
        return f"{label}'s forward failed on a probe input ({type(exc).__name__}: {exc})"
    if probe.problem is not None:
        return f"{label}: {probe.problem}"
    if len(probe.calls) != 1:
        return f"{label}'s forward calls conv2d {len(probe.calls)} times (DCP understands one)"
    call, result = probe.calls[0]
    if out is not result:
        return f"{label}'s forward does not return its conv's result"
    if id(call.input) not in probe.from_input or call.input.shape[1] != conv.in_channels:
        return f"{label}'s conv does not read the module's input channels"
    if tuple(call.weight.shape) != tuple(conv.weight.shape):
        return f"{label}'s conv weight has shape {tuple(call.weight.shape)}, not its parameter's"
    if (call.bias is None) != (conv.bias is None):
        return f"{label}'s conv {'adds a bias it does not own' if conv.bias is None else 'drops its bias'}"
    if (_pair(call.stride), _pair(call.dilation), call.groups) != (conv.stride, conv.dilation, conv.groups):
        return f"{label}'s conv runs with other stride, dilation or groups than the module's"
    if conv.padding_mode != "zeros":
        return f"{label} has its own forward and padding_mode={conv.padding_mode!r}"
    form = ConvForm(transforms_weight=call.weight is not conv.weight or call.bias is not conv.bias,
                    pads_input=call.input is not x)
    if form.transforms_weight and form.pads_input:
        return (f"{label}'s forward both transforms its weight and pads its input: finalize() has no ordinary "
                "module with equal outputs for that")
    return form


def _pair(value: Any) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def explicit_padding(call: ConvCall, conv: nn.Conv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """The call's input and integer padding ('same'/'valid' turned into explicit padding, as
    ``nn.Conv2d`` does)."""
    if call.padding == "valid":
        return call.input, (0, 0)
    if call.padding == "same":
        pad: list[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
        return F.pad(call.input, pad), (0, 0)
    return call.input, _pair(call.padding)


def adopt_tensors(layer: nn.Module, module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Register ``module``'s parameters, buffers and children on ``layer`` under their own names
    (those in ``skip`` aside): the layer takes its place in the model, the state dict keeps its keys."""
    for name, param in module._parameters.items():
        if name not in skip:
            layer.register_parameter(name, param)
    for name, buf in module._buffers.items():
        if name not in skip:
            layer.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
    for name, child in module._modules.items():
        layer.add_module(name, child)


def point_at(module: nn.Module, layer: nn.Module) -> None:
    """Point a hidden original module's tensors and children at those ``layer`` registered in its
    place under the same names (a moved, reloaded or reassigned tensor is the one its forward uses)."""
    for name in module._parameters:
        module._parameters[name] = layer._parameters[name]
    for name in module._buffers:
        module._buffers[name] = layer._buffers[name]
    for name in module._modules:
        module._modules[name] = layer._modules[name]
    module.training = layer.training


class OwnForward:
    """A conv subclass's own forward, run on a :class:`~dcp_kernels.DCPConv2d`'s tensors.

    Keeps the original module (out of the layer's children: its tensors are registered on the layer
    itself, under the same names) and, at each call, points its tensors at the layer's, so a moved,
    reloaded or reassigned parameter is the one used."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.module = conv
        self.transforms_weight, self.pads_input = conv_form(conv)

    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    def call(self, layer: nn.Module, x: torch.Tensor) -> ConvCall:
        """The conv's operands for input ``x`` (the forward stops at the conv; nothing is convolved)."""
        if layer is not self.module:
            point_at(self.module, layer)
        try:
            with _StopAtConv():
                self.module(x)
        except _Reached as reached:
            return reached.call
        raise RuntimeError(f"{self.class_name}'s forward returned without calling conv2d")

    @torch.no_grad()
    def weight_and_bias(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the forward convolves with (detached)."""
        call = self.call(layer, _probe_input(self.module))
        return call.weight.detach(), None if call.bias is None else call.bias.detach()

    def copy_with(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                  share: bool = False) -> nn.Conv2d:
        """A copy of the original module (its class and forward) holding ``weight`` and ``bias``;
        ``share``: nothing was cut, the copy holds the layer's own tensors (ties stay tied)."""
        point_at(self.module, layer)
        if share:
            new = copy.copy(self.module)
            new._parameters, new._buffers, new._modules = (dict(self.module._parameters), dict(self.module._buffers),
                                                           dict(self.module._modules))
            return new
        new = copy.deepcopy(self.module)
        new.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias.clone(), requires_grad=layer.bias.requires_grad)
        new.out_channels, new.in_channels, new.groups = weight.shape[0], weight.shape[1] * groups, groups
        return new
