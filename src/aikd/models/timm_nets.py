"""Any timm architecture by name: ``model.name: timm/<arch>`` (timm is an optional extra: pip install timm).

The network is ``timm.create_model(arch, pretrained=False, num_classes=C, in_chans=...)``
plus ``model.kwargs`` (for a ViT on small images: ``img_size`` is the data's by default,
``patch_size`` is yours to set). It keeps timm's own module names, so a checkpoint of it
loads back into the plain timm model (``aikd export``), and ``model.weights`` loads a timm
checkpoint file into it. Penultimate features are timm's pre-logits (pooled) features.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from aikd.errors import ConfigError, did_you_mean

PREFIX = "timm/"


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("model.name=timm/... needs timm: pip install timm (or pip install 'aikd[timm]').") from None
    return timm


def check_timm_name(name: str, key: str = "model.name") -> None:
    """Refuse an architecture timm does not have, naming the key and a close match."""
    arch = name[len(PREFIX):]
    timm = _timm()
    if not timm.is_model(arch):
        raise ConfigError(f"Unknown timm architecture '{arch}' (config key '{key}')."
                          f"{did_you_mean(arch, timm.list_models())} See timm.list_models() for the choices.")


class TimmClassifier(nn.Module):
    """A timm model behind aikd's classifier interface: logits, and on request pre-logits features too."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features
        self.num_classes = net.num_classes

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if not return_features:
            return self.net(x)
        features = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net.get_classifier()(features), features


def build_timm(name: str, num_classes: int, in_channels: int, image_size: int,
               kwargs: dict[str, Any] | None = None) -> TimmClassifier:
    arch = name[len(PREFIX):]
    timm = _timm()
    options = dict(kwargs or {})

    def create(**extra: Any) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                 **options, **extra)

    try:
        if "img_size" in options:
            return TimmClassifier(create())
        try:  # a ViT's position embeddings follow the data's image size; CNNs take no img_size
            return TimmClassifier(create(img_size=image_size))
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            return TimmClassifier(create())
    except TypeError as err:
        raise ConfigError(f"timm/{arch} does not take model.kwargs {sorted(options)}: {err}") from None
