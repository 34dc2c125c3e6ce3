"""Every fast backend against the reference op: forward, grad-input, grad-weight, grad-bias."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, device_backend_params, fast_backends, sorted_subset

from dcp_kernels import ops

# Every backend that runs on CPU tensors here (Triton through its interpreter).
FAST_BACKENDS = fast_backends("cpu")

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, bias)
SHAPES = [
    (2, 8, 6, 9, 9, 3, 1, 1, 1, 1, True),
    (3, 5, 7, 10, 7, 3, 2, 1, 1, 1, False),
    (2, 6, 4, 11, 11, 3, 1, 2, 2, 1, True),
    (1, 4, 9, 5, 6, 1, 1, 0, 1, 1, True),
    (2, 7, 5, 8, 8, (3, 1), (2, 1), (1, 0), 1, 1, False),
    (2, 6, 6, 9, 9, 3, 1, 1, 1, 6, True),   # depthwise
    (2, 5, 5, 8, 7, 3, 2, 1, 1, 5, False),  # depthwise, strided
    # Weight blocks bigger than the input (the deep layers of a CIFAR VGG): the torch backend keeps
    # the weight, not the gathered block, and gathers it again in backward.
    (1, 12, 10, 2, 2, 3, 1, 1, 1, 1, True),
    (1, 6, 6, 2, 2, 3, 1, 1, 1, 6, False),  # depthwise
]
KEEPS = ["all", "half", "one"]


def _keep(n: int, mode: str, seed: int) -> torch.Tensor:
    k = {"all": n, "half": max(1, n // 2), "one": 1}[mode]
    return sorted_subset(n, k, seed)


def _run(backend, x, w, b, in_idx, out_idx, conf, layout="full"):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = ops.gathered_conv2d(x, w, b, in_idx, out_idx, *conf, backend=backend, layout=layout)
    # A logical-order gradient (randn_like would follow y's memory layout).
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    (y * g).sum().backward()
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("device, backend", device_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-g{s[9]}")
@pytest.mark.parametrize("keep_in", KEEPS)
@pytest.mark.parametrize("keep_out", KEEPS)
def test_backend_matches_reference(device, backend, shape, keep_in, keep_out):
    """The reference on the same device is the oracle (on CUDA: cuDNN with TF32 off)."""
    n, cin, cout, h, w_, k, stride, pad, dil, groups, has_bias = shape
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w_, device=device)
    w = torch.randn(cout, cin // groups, kh, kw, device=device)
    b = torch.randn(cout, device=device) if has_bias else None
    in_idx, out_idx = _keep(cin, keep_in, 1).to(device), _keep(cout, keep_out, 2).to(device)
    conf = (stride, pad, dil, groups)
    ref = _run("reference", x, w, b, in_idx, out_idx, conf)
    got = _run(backend, x, w, b, in_idx, out_idx, conf)
    for name, r, o in zip(("y", "grad_x", "grad_w", "grad_b"), ref, got):
        if r is None:
            assert o is None
            continue
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # Exact zeros outside the selection, forward and backward.
    dropped_out = torch.ones(cout, dtype=torch.bool, device=device)
    dropped_out[out_idx] = False
    assert torch.count_nonzero(got[0][:, dropped_out]) == 0
    assert torch.count_nonzero(got[2][dropped_out]) == 0
    if groups == 1:
        dropped_in = torch.ones(cin, dtype=torch.bool, device=device)
        dropped_in[in_idx] = False
        assert torch.count_nonzero(got[1][:, dropped_in]) == 0
        assert torch.count_nonzero(got[2][:, dropped_in]) == 0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compact_layout_is_the_selected_slice(backend):
    x, w = torch.randn(2, 6, 7, 7), torch.randn(8, 6, 3, 3)
    in_idx, out_idx = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 6])
    full = ops.gathered_conv2d(x, w, None, in_idx, out_idx, 1, 1, backend=backend)
    compact = ops.gathered_conv2d(x, w, None, in_idx, out_idx, 1, 1, backend=backend, layout="compact")
    assert compact.shape == (2, 3, 7, 7)
    torch.testing.assert_close(compact, full[:, out_idx])


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_channels_last_and_non_contiguous_inputs(device, backend):
    x = torch.randn(2, 6, 9, 9, device=device)
    w = torch.randn(5, 6, 3, 3, device=device)
    in_idx, out_idx = torch.tensor([0, 2, 3], device=device), torch.tensor([1, 4], device=device)
    permuted = torch.randn(2, 9, 9, 6, device=device).permute(0, 3, 1, 2)
    for variant in (x.contiguous(memory_format=torch.channels_last), permuted):
        assert not variant.is_contiguous()
        ref = _run("reference", variant.contiguous(), w, None, in_idx, out_idx, (1, 1, 1, 1))
        got = _run(backend, variant, w, None, in_idx, out_idx, (1, 1, 1, 1))
        for r, o in zip(ref[:3], got[:3]):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("groups", [1, 4])
def test_gradcheck_fp64(backend, groups):
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    in_idx, out_idx = torch.tensor([0, 2, 3]), torch.tensor([1, 3])

    def f(x, w, b):
        return ops.gathered_conv2d(x, w, b, in_idx, out_idx, 2, 1, 1, groups, backend=backend)

    # Triton runs in its interpreter here: fast mode (random projections) keeps it to seconds.
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=backend == "triton")


def _per_group(width: int, groups: int, per_group: int, seed: int) -> torch.Tensor:
    """Sorted indices keeping ``per_group`` channels in each of ``groups`` equal blocks of ``width``."""
    size = width // groups
    return torch.cat([sorted_subset(size, per_group, seed + g) + g * size for g in range(groups)])


# Grouped convs (1 < groups, not depthwise): (N, C_in, C_out, H, W, kernel, stride, padding,
# dilation, groups, bias), then the kept inputs and outputs per group.
GROUPED = [
    pytest.param((2, 8, 12, 7, 7, 3, 1, 1, 1, 4, True), 1, 2, id="8to12-g4-keep1of2-2of3"),
    pytest.param((2, 12, 6, 9, 8, 3, 2, 1, 1, 3, False), 4, 2, id="12to6-g3-all-in-all-out"),
    pytest.param((3, 12, 8, 8, 8, 3, 1, 2, 2, 2, True), 3, 1, id="12to8-g2-dilated-keep3of6-1of4"),
    pytest.param((2, 4, 8, 6, 6, 3, 1, 1, 1, 4, True), 1, 1, id="4to8-g4-multiplier-keep1of2"),
    pytest.param((2, 6, 6, 5, 5, 1, 1, 0, 1, 2, False), 2, 3, id="6to6-g2-1x1-keep2of3-all"),
    # A weight block bigger than the input: gathered again in backward (see SHAPES).
    pytest.param((1, 16, 16, 2, 2, 3, 1, 1, 1, 2, True), 3, 5, id="16to16-g2-2x2px-block-gathered-again"),
]


@pytest.mark.parametrize("device", [pytest.param(d, id=f"{d}-torch") for d in DEVICES])
@pytest.mark.parametrize("shape, keep_in, keep_out", GROUPED)
def test_grouped_conv_matches_reference(device, shape, keep_in, keep_out):
    """Grouped convs run on the torch backend as a smaller grouped conv: the same output and
    gradients as the reference (masks around the dense grouped conv), exact zeros elsewhere."""
    n, cin, cout, h, w_, k, stride, pad, dil, groups, has_bias = shape
    x, w = torch.randn(n, cin, h, w_, device=device), torch.randn(cout, cin // groups, k, k, device=device)
    b = torch.randn(cout, device=device) if has_bias else None
    in_idx = _per_group(cin, groups, keep_in, 1).to(device)
    out_idx = _per_group(cout, groups, keep_out, 2).to(device)
    conf = (stride, pad, dil, groups)
    ref = _run("reference", x, w, b, in_idx, out_idx, conf)
    got = _run("torch", x, w, b, in_idx, out_idx, conf)
    for name, r, o in zip(("y", "grad_x", "grad_w", "grad_b"), ref, got):
        if r is not None:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    dropped_in = torch.ones(cin, dtype=torch.bool, device=device)
    dropped_in[in_idx] = False
    assert torch.count_nonzero(got[1][:, dropped_in]) == 0
    # Weight gradient only on the block each kept output reads: its own group's kept inputs.
    live = torch.zeros(cout, cin // groups, dtype=torch.bool, device=device)
    for o in out_idx.tolist():
        g = o // (cout // groups)
        live[o, [i - g * (cin // groups) for i in in_idx.tolist() if i // (cin // groups) == g]] = True
    assert torch.count_nonzero(got[2][~live]) == 0
    # Compact input (what a compact producer passes on): same output, the compact gradient.
    x_c = x[:, in_idx].detach().requires_grad_(True)
    y_c = ops.gathered_conv2d(x_c, w, b, in_idx, out_idx, *conf, backend="torch", input_layout="compact")
    torch.testing.assert_close(y_c, ref[0], rtol=1e-5, atol=1e-5)
    (y_c * torch.randn(y_c.shape, generator=torch.Generator().manual_seed(1)).to(device)).sum().backward()
    torch.testing.assert_close(x_c.grad, ref[1][:, in_idx], rtol=1e-5, atol=1e-5)


def test_grouped_conv_gradcheck_fp64():
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    in_idx, out_idx = torch.tensor([1, 2, 4, 7]), torch.tensor([0, 5])

    def f(x, w, b):
        return ops.gathered_conv2d(x, w, b, in_idx, out_idx, 1, 1, 1, 2, backend="torch")

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b in ("triton", "extension")])
def test_grouped_conv_is_refused_where_no_kernel_exists(backend):
    x, w = torch.randn(2, 8, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.raises(NotImplementedError, match=f"backend '{backend}' has no grouped-conv kernel"):
        ops.gathered_conv2d(x, w, None, torch.tensor([0, 4]), torch.tensor([1, 3]), 1, 1, 1, 2, backend=backend)


def test_channel_utility_definition():
    a, g = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    expected = torch.tensor([
        sum(abs(float((g[b, c] * a[b, c]).sum())) for b in range(3)) / (3 * 5 * 6) for c in range(4)
    ])
    torch.testing.assert_close(ops.channel_utility(a, g), expected)
    assert ops.channel_utility(a.double(), g.double()).dtype == torch.float32


def test_backends_report_what_runs():
    """Every backend ``backends()`` calls usable computes the op; every other one is refused by
    name; ``auto`` picks a usable fast backend."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 3, 3)
    in_idx, out_idx = torch.tensor([0, 2]), torch.tensor([1])
    want = F.conv2d(x * torch.tensor([1.0, 0, 1, 0]).view(1, 4, 1, 1), w, padding=1)[:, [1]]
    for name, usable in ops.backends("cpu").items():
        if usable:
            got = ops.gathered_conv2d(x, w, None, in_idx, out_idx, padding=1, backend=name, layout="compact")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable"):
                ops.resolve_backend(name, torch.device("cpu"))
    auto = ops.resolve_backend("auto", torch.device("cpu"))
    assert auto != "reference" and ops.backends("cpu")[auto]


def test_triton_versions_are_read_from_release_strings():
    assert ops.parse_triton_version("3.6.0") == (3, 6)
    assert ops.parse_triton_version("3.6.0+git1234abcd") == (3, 6)
    assert ops.parse_triton_version("3.10.1") == (3, 10) and (3, 10) >= ops.MIN_TRITON
    assert ops.parse_triton_version("3.2.0") < ops.MIN_TRITON
    assert ops.parse_triton_version("unknown") is None


def test_an_old_triton_is_refused_with_its_version(monkeypatch):
    """torch 2.6 ships Triton 3.2, which lacks what the kernels use: the backend is unavailable and
    naming it says why (the version check reads package metadata; here the answer is patched in)."""
    monkeypatch.setattr(ops, "_TRITON_VERSION", (3, 2))
    monkeypatch.setattr(ops, "_TRITON_INSTALLED", False)
    assert not ops.backends("cpu")["triton"] and not ops.backends("cuda")["triton"]
    with pytest.raises(RuntimeError, match=r"Triton 3\.2 is older than the 3\.6 its kernels need"):
        ops.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(x=torch.randn(6, 9, 9)), ValueError, "4-D"),
        (lambda a: a.update(x=torch.randn(2, 5, 9, 9)), ValueError, "channels"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "dtype"),
        (lambda a: a.update(x=a["x"].long()), TypeError, "floating-point"),
        (lambda a: a.update(x=torch.empty(2, 6, 9, 9, device="meta")), ValueError, "meta"),
        (lambda a: a.update(in_idx=torch.tensor([0, 6])), IndexError, "in_idx"),
        (lambda a: a.update(out_idx=torch.tensor([], dtype=torch.long)), ValueError, "out_idx is empty"),
        (lambda a: a.update(out_idx=torch.tensor([2, 1])), ValueError, "sorted"),
        (lambda a: a.update(in_idx=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "int64"),
        (lambda a: a.update(bias=torch.randn(3)), ValueError, "bias"),
        (lambda a: a.update(weight=torch.randn(4, 3, 3, 3), groups=3), ValueError, "groups=3"),
        (lambda a: a.update(weight=torch.randn(4, 3, 3, 3), groups=2, in_idx=torch.tensor([0, 1, 3])),
         ValueError, "in_idx must keep the same number of channels in each of the 2 groups"),
        (lambda a: a.update(weight=torch.randn(4, 3, 3, 3), groups=2, in_idx=torch.tensor([0, 3]),
                               out_idx=torch.tensor([0, 1])),
         ValueError, r"out_idx must keep the same number .* \[2, 0\]"),
    ],
)
def test_bad_arguments_are_named(mutate, error, match):
    args = dict(x=torch.randn(2, 6, 9, 9), weight=torch.randn(4, 6, 3, 3), bias=None,
                in_idx=torch.tensor([0, 1]), out_idx=torch.tensor([0, 3]), groups=1)
    mutate(args)
    with pytest.raises(error, match=match):
        ops.gathered_conv2d(args["x"], args["weight"], args["bias"], args["in_idx"], args["out_idx"],
                            1, 1, 1, args["groups"], backend="torch")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        ops.resolve_backend("cudnn")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compact_input_layout(backend):
    """x holding only the channels in_idx: same output, and grad-input is the reference's on in_idx."""
    x, w, b = torch.randn(2, 7, 8, 8), torch.randn(5, 7, 3, 3), torch.randn(5)
    in_idx, out_idx = torch.tensor([1, 2, 6]), torch.tensor([0, 3])
    ref = _run("reference", x * torch.isin(torch.arange(7), in_idx).view(1, -1, 1, 1).float(), w, b,
               in_idx, out_idx, (2, 1, 1, 1))
    x_c = x[:, in_idx].detach().requires_grad_(True)
    y = ops.gathered_conv2d(x_c, w, b, in_idx, out_idx, 2, 1, backend=backend, input_layout="compact")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    torch.testing.assert_close(y, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_c.grad, ref[1][:, in_idx], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="len\\(in_idx\\)=3"):
        ops.gathered_conv2d(x, w, b, in_idx, out_idx, backend=backend, input_layout="compact")


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b in ("triton", "extension")])
def test_torch_compile_fullgraph(backend):
    """The compiled backends are custom ops: fullgraph=True fails on any graph break, and aot_eager
    runs their fake kernels and autograd formula."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    in_idx, out_idx = torch.tensor([0, 3]), torch.tensor([1, 2, 4])

    def f(x, w):
        y = ops.gathered_conv2d(x, w, None, in_idx, out_idx, 1, 1, backend=backend, layout="compact", validate=False)
        return torch.relu(y).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    compiled(xs, ws).backward()
    f(xe, we).backward()
    torch.testing.assert_close(xs.grad, xe.grad)
    torch.testing.assert_close(ws.grad, we.grad)


@pytest.mark.parametrize("case", ["groups1", "groups1-compact-input", "groups1-channels-last", "depthwise", "grouped"])
def test_torch_backend_compile_op_passes_opcheck(case):
    """Under torch.compile the torch backend's compact conv is the custom op
    ``dcp_torch::compact_conv2d`` (shape-polymorphic, docs/api.md): its fake kernel, autograd and
    schema pass opcheck, and it computes what the eager path computes."""
    from dcp_kernels.ops import compact

    x_compact = case == "groups1-compact-input"
    groups, cin, cout = {"depthwise": (6, 6, 6), "grouped": (2, 6, 4)}.get(case, (1, 6, 5))
    x = torch.randn(2, cin, 7, 7)
    if case == "groups1-channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(cout, cin // groups, 3, 3, requires_grad=True)
    b = torch.randn(cout, requires_grad=True)
    in_idx = torch.tensor([0, 2, 4, 5]) if groups != 2 else torch.tensor([0, 2, 3, 5])
    out_idx = torch.tensor([1, 3]) if groups != 6 else torch.tensor([0, 2, 5])
    if x_compact:
        x = x[:, in_idx].detach().requires_grad_(True)
    args = (x, w, b, in_idx, out_idx, [1, 1], [1, 1], [1, 1], groups, x_compact)
    torch.library.opcheck(compact._compact_conv2d_op, args)
    y_op = compact._compact_conv2d_op(*args)
    y_eager = compact.compact_conv2d(x, w, b, in_idx, out_idx, (1, 1), (1, 1), (1, 1), groups, x_compact)
    torch.testing.assert_close(y_op, y_eager)
    g = torch.randn(y_op.shape)
    grads_op = torch.autograd.grad((y_op * g).sum(), (x, w, b))
    grads_eager = torch.autograd.grad((y_eager * g).sum(), (x, w, b))
    for a, e in zip(grads_op, grads_eager):
        torch.testing.assert_close(a, e)
