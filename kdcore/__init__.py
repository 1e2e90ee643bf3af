"""kdcore: find where a teacher model is wrong and measure whether bias-aware distillation pays."""

__version__ = "0.1.0"
