"""Datasets and LightningDataModules: patches of slides (`patches`, `unlabelled_patches`), cached features
(`feature_cache`, `feature_bags`), whole-slide bags (`slide_bags`), patient bags, samplers, augmentation and the digit
bags of the MIL literature."""
