"""CrossDNA: a dual-branch, cross-strand DNA language model, and the system that pretrains and serves it."""

__version__ = "0.1.0"
