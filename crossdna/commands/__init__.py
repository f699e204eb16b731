"""Thin CLI adapters: argument parsing only; the work lives in the packages they call."""
