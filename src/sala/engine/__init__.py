"""Inference engine: generation helpers, decode graphs, the HTTP server (the floor above the model)."""
