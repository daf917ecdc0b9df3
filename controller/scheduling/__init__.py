"""Endpoint scheduling: filters → weighted scorers → picker, configured by a YAML profile."""
