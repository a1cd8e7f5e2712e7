"""Lifelong-sequence models: search-based interest over thousands of past events."""
