"""A vLLM-faithful simulator: same HTTP API, errors, metrics and LoRA slot behaviour."""
