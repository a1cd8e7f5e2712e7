"""Multi-modal models: item content fused with IDs end-to-end."""
