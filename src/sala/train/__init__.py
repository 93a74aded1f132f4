"""Staged Transformer -> SALA training: alignment, distillation, continual LM and long-context stages."""
