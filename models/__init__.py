"""Value types, segmentation models and their packages.

Only this package (and what depends on it) imports torch; ``models.types`` does not.
"""
