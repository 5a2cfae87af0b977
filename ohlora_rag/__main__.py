"""`python -m ohlora_rag` runs the command line."""

from .cli import run

run()
