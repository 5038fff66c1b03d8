"""icmil-pl: whole-slide-image MIL with PyTorch Lightning (ICMIL and exact chunked end-to-end training)."""

__version__ = "0.1.0"
