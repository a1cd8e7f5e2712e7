"""Cross-domain recommendation models."""
