"""Serving: an AUTOMATIC1111-compatible HTTP API and a web page (`diffuse serve`)."""
