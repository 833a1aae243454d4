"""unsupdistill: DINO-style self-supervised pretraining on any image folder."""

__version__ = "0.1.0"
