"""Serving a trained model: export, encoding, scoring and retrieval over an item index."""
