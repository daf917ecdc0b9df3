"""Sidecar beside each vLLM server: reconciles the adapter ConfigMap against vLLM."""
