"""Multi-stage training and evaluation protocols built from the core pieces."""
