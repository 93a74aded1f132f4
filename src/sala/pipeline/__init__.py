"""Transformer -> SALA end to end: HALO selection, equal-budget comparison, staged training, evaluation, report."""

from .profile import Profile, ProfileError, load_profile, parse_profile
from .run import PHASES, Pipeline

__all__ = ["PHASES", "Pipeline", "Profile", "ProfileError", "load_profile", "parse_profile"]
