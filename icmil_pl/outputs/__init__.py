"""What `predict` writes beside a run: figures (`plots`), every patch's scores (`patch_scores`, scores.zarr) and the
QuPath tiles (`qupath`)."""
