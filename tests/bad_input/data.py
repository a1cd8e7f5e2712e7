"""Mistakes in data files and schemas."""

CASES = []
