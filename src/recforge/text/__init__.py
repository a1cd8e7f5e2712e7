"""Text features: offline sentence embeddings (needs the ``text`` extra)."""

from recforge.text.encoder import SentenceEncoder

__all__ = ["SentenceEncoder"]
