"""aikd: self-knowledge distillation for image classifiers (AI-KD and the methods it is compared with)."""

from aikd.registry import METHOD_CONFIGS

__version__ = "0.1.0"


def _register_shipped_methods() -> None:
    from aikd import methods  # noqa: F401  (each method registers itself and its config schema)


# The first lookup of a method's config schema (aikd.config, when it reads a config) imports the shipped methods,
# as `import timm` registers timm's models, but lazily: a command that reads no config starts without torch.
METHOD_CONFIGS.fill_with(_register_shipped_methods)
