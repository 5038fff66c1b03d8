"""icmil-pl: whole-slide-image MIL with PyTorch Lightning (ICMIL and exact chunked end-to-end training)."""

from data_modules.aliases import alias_modules

__version__ = "0.1.0"

# Configs saved before the encoders moved into their folder name `icmil_pl.embedder.PatchEmbedder` and friends.
alias_modules(__name__, {"embedder": "encoders.embedder", "finetune": "encoders.finetune"})
