"""Datasets and LightningDataModules: patches of slides (`patches`, `unlabelled_patches`), cached features
(`feature_cache`, `feature_bags`), whole-slide bags (`slide_bags`), patient bags, samplers, augmentation and the digit
bags of the MIL literature.

Every module here is imported with the package, so a data module added as a file is known to the CLI (jsonargparse
resolves classes it has seen) without a line elsewhere.
"""

import pkgutil
from importlib import import_module

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")
