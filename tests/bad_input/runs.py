"""Mistakes with run folders, checkpoints and bundles."""

CASES = []
