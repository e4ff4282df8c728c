"""Datasets, transforms, category lists and the synthetic toy world."""
