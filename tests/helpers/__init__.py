"""Shared test helpers (independent references, fixtures) for the lightning_rnnviz test suite."""
