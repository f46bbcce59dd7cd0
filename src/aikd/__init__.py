"""aikd: self-knowledge distillation for image classifiers (AI-KD and the methods it is compared with)."""

__version__ = "0.1.0"

# Importing aikd registers the shipped methods (as `import timm` registers timm's models), so that
# aikd.config finds each one's hyper-parameter schema in aikd.registry.METHOD_CONFIGS without importing them.
from aikd import methods  # noqa: F401
