"""convert() on Hugging Face ``transformers`` vision models, built from small configs (no download):
``ModelOutput`` outputs, keyword inputs, the recorded run where torch.fx cannot trace them. Each model:
the round trip of test_zoo.py (convert, train, finalize equal and smaller) and the fast backend
against the reference over selecting steps."""
import pytest
import torch
import torch.nn.functional as F
from test_zoo import FAST, convert_train_finalize, train_like_the_reference

import dcp_kernels

transformers = pytest.importorskip("transformers")

# Small configs of each family (32 px inputs, 5 labels). EfficientNet's head width must equal its
# last stage's rounded width (hidden_dim).
CONFIGS = {
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig", dict(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)),
    "bit": ("BitForImageClassification", "BitConfig", dict(
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=4)),
    "convnextv2": ("ConvNextV2ForImageClassification", "ConvNextV2Config", dict(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])),
    "resnet": ("ResNetForImageClassification", "ResNetConfig", dict(
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck")),
    "regnet": ("RegNetForImageClassification", "RegNetConfig", dict(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", dict(
        image_size=32, depth_multiplier=0.35)),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", dict(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])),
}
# Refused before this file existed: EfficientNet left 112 convs dense, BiT and ConvNeXt V2 had
# "no prunable conv layer found".
NEW = ["efficientnet", "bit", "convnextv2"]


def make(family: str):
    model_class, config_class, kwargs = CONFIGS[family]
    config = getattr(transformers, config_class)(num_labels=5, **kwargs)
    model = getattr(transformers, model_class)(config)
    for m in model.modules():
        if type(m).__name__ == "ConvNextV2GRN":  # starts at zero, where it does nothing
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            # PyTorch's initialisation: EfficientNet's own saturates its squeeze-excitation sigmoids at
            # 32 px, leaving gradients of 1e-37 there that float32 utilities cannot hold (checked in float64).
            m.reset_parameters()
    return model.train()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_transformers_models_round_trip(family):
    model = make(family)
    _, prop, plain = convert_train_finalize(model, size=32)
    assert isinstance(plain(torch.randn(2, 3, 32, 32)), transformers.utils.ModelOutput)
    if family in NEW:
        # Every conv left dense, with a reason that is expected: residual sums (prune_residual=False),
        # depthwise convs (they follow their input), ConvNeXt's permutes into tokens and out of them,
        # EfficientNet's head (its pooling reshapes to sizes a recorded run reads as numbers).
        expected = ("(prune_residual=False)", "depthwise: follows the channels of its input",
                    "a depthwise conv produces it from a dense input", "permute'",
                    "a recorded run (torch.fx could not trace the model)")
        dense = [line for line in prop.report().splitlines() if "left dense" in line]
        assert all(any(reason in line for reason in expected) for line in dense), dense


@pytest.mark.parametrize("family", NEW)
def test_keyword_inputs_and_model_outputs(family):
    model = make(family)
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(torch.randn(2, 3, 32, 32),))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    for _ in range(2):
        out = model(pixel_values=x, labels=y)  # the model's own loss
        out.loss.backward()
    assert not all(bool(layer.selected.all()) for layer in prop.layers)
    model.eval()
    plain = prop.finalize().eval()
    with torch.no_grad():
        # Measured: at most 2.5e-7 on logits of O(0.05-1) (EfficientNet exactly equal).
        torch.testing.assert_close(plain(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("family", NEW)
def test_transformers_models_train_like_the_reference(family, backend):
    train_like_the_reference(lambda: make(family), backend, 32)


def test_finalized_model_saves_whole_but_from_pretrained_cannot_rebuild_it(tmp_path):
    """What holds: the finalized model is still the transformers class (its forward, ModelOutput,
    ``save_pretrained``), and ``torch.save`` of the whole module loads back equal. What does not: its
    config still describes the original widths, so ``from_pretrained`` builds the unpruned model and
    refuses the smaller weights (docs/convert.md)."""
    model = make("bit")
    prop = dcp_kernels.convert(model, 0.5, explore_epochs=0, example_inputs=(torch.randn(2, 3, 32, 32),))
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        F.cross_entropy(model(pixel_values=x).logits, torch.arange(4)).backward()
    plain = prop.finalize().eval()
    assert type(plain) is transformers.BitForImageClassification
    plain.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.BitForImageClassification.from_pretrained(tmp_path)
    torch.save(plain, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, plain(x).logits, rtol=0, atol=0)
