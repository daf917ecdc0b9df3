"""Envoy ext_proc endpoint picker protocol (DESIGN §3)."""
