"""Tokenizers (text <-> ids), used by training, sampling and interop alike."""
