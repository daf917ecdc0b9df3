"""loractl: LoRA adapter lifecycle for vLLM on Kubernetes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loractl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
