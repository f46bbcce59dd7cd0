"""Architectures: a registry of classifiers that return logits and, on request, features."""

from aikd.models import preact_resnet, small_cnn, torchvision_nets
from aikd.models.base import MODELS, Classifier, build_model, resolve_stem

__all__ = ["MODELS", "Classifier", "build_model", "preact_resnet", "resolve_stem", "small_cnn", "torchvision_nets"]
