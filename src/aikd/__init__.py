"""aikd: self-knowledge distillation for image classifiers (AI-KD and the methods it is compared with)."""

__version__ = "0.1.0"
