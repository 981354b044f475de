"""azgpt: train a GPT on Azerbaijani text from scratch with PyTorch Lightning."""

__version__ = "0.1.0"
