"""aikd.models.taps: forward hooks on the bare student catch the pre-pool map and a named layer's output, only
inside ``capture()``, equal to the tensors computed by hand; also through ``torch.compile`` with no graph break."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aikd.errors import ConfigError
from aikd.models import build_model
from aikd.models.base import Classifier, GlobalAvgPool
from aikd.models.taps import Tap, find_module, global_pool, head_of, output_channels, pooled

pytestmark = pytest.mark.usefixtures("one_thread")


def preact(size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return build_model("preact_resnet18", 10, 3, size).eval()


def test_the_pre_pool_map_equals_the_map_computed_by_hand():
    model, x = preact(), torch.randn(3, 3, 8, 8)
    tap = Tap(global_pool(model), input=True)
    with tap.capture():
        logits = model(x)
    caught = tap.take()
    f = model.features
    with torch.no_grad():
        by_hand = F.relu(f.bn(f.layers(f.stem(x))))
    assert caught.shape == (3, 512, 1, 1)
    torch.testing.assert_close(caught, by_hand)
    torch.testing.assert_close(model.head(caught.mean((2, 3))), logits)  # the head on the pooled map: the logits


def test_a_named_layer_output_equals_the_output_computed_by_hand():
    model, x = preact(16), torch.randn(2, 3, 16, 16)
    tap = Tap(find_module(model, "features.layers.5", "uskd.feature_layer"))
    with tap.capture():
        model(x)
    with torch.no_grad():
        by_hand = model.features.layers[:6](model.features.stem(x))
    torch.testing.assert_close(tap.take(), by_hand)
    assert output_channels(model, model.features.layers[5]) == 256 == pooled(by_hand).shape[1]
    assert model.training is False  # the probe restores the mode it found


def test_a_tap_catches_only_while_armed_and_forgets_what_it_hands_over():
    model, x = preact(), torch.randn(2, 3, 8, 8)
    tap = Tap(global_pool(model), input=True)
    model(x)  # an evaluation forward outside capture(): nothing is kept
    assert tap.value is None
    with tap.capture():
        model(x)
        model(2 * x)  # the last forward of the block overwrites the first
    with torch.no_grad():
        f = model.features
        expected = F.relu(f.bn(f.layers(f.stem(2 * x))))
    torch.testing.assert_close(tap.take(), expected)
    assert tap.value is None
    with pytest.raises(RuntimeError, match="no forward pass"):
        tap.take()
    pickle.dumps(model)  # a model with a tap still pickles (torch.save(model))
    tap.remove()
    with tap.capture():
        model(x)
    assert tap.value is None


class TinyPooled(Classifier):
    def __init__(self) -> None:
        features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 GlobalAvgPool())
        super().__init__(features, 8, 5)


def test_taps_run_inside_a_compiled_model_without_a_graph_break():
    """fullgraph=True raises at a graph break: Dynamo traces the hooks and returns the caught tensors as outputs."""
    torch.manual_seed(0)
    model, x = TinyPooled(), torch.randn(4, 3, 6, 6)
    pre_pool, layer = Tap(global_pool(model), input=True), Tap(find_module(model, "features.1", "key"))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with pre_pool.capture(), layer.capture():
        logits = compiled(x)
    caught_map, caught_layer = pre_pool.take(), layer.take()
    with torch.no_grad():
        first = F.relu(model.features[0](x))
        by_hand = F.relu(model.features[2](first))
    torch.testing.assert_close(caught_map, by_hand)
    torch.testing.assert_close(caught_layer, first)
    torch.testing.assert_close(logits, model(x))
    assert caught_map.requires_grad  # part of the graph: a loss on it trains the model
    compiled(x)  # not armed: the compiled graph without the capture keeps nothing
    assert pre_pool.value is None and layer.value is None


def test_an_unknown_module_name_is_a_config_error_naming_it_and_the_choices():
    model = preact()
    with pytest.raises(ConfigError, match=r"'uskd.feature_layer'.*no module 'features.layer5'.*"
                                          r"Did you mean 'features.layers.5'.*features.layers.7.conv2, features.bn"):
        find_module(model, "features.layer5", "uskd.feature_layer")


def test_head_of_finds_aikd_torchvision_and_timm_heads():
    from torchvision.models import resnet18

    model = preact()
    assert head_of(model) is model.head
    tv = resnet18(num_classes=7)
    assert head_of(tv) is tv.fc
    assert global_pool(tv) is None  # torchvision's own model pools with AdaptiveAvgPool2d
