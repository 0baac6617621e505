"""visionflow core: datasets, transforms, models, training engine, checkpoints, evaluation."""

__version__ = "0.1.0"
