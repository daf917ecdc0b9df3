"""Endpoint scheduling: filters → weighted scorers → picker, configured by a YAML profile."""

from __future__ import annotations


def compiled() -> bool:
    """Whether the decision path runs as compiled code: built with LORACTL_COMPILE=1 (see
    setup.py), as the container image is, rather than interpreted from source."""
    # Imported here, not at the top: every module of the package imports this one first.
    from controller.scheduling import pipeline

    return not str(pipeline.__file__).endswith(".py")
