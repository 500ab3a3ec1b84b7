"""Tokenizers: text vocabularies (SentencePiece) and, later, image tokenizers."""
