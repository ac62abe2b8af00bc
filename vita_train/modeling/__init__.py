"""VITA on Mask2Former, one module per part of the architecture."""
