"""Real text corpora for training and evaluation, installed offline through package registries."""

from .cache import cache_dir
from .corpora import SOURCES, load_text, prepare, resolve_text
from .fetch import SourceUnavailable

__all__ = ["SOURCES", "SourceUnavailable", "cache_dir", "load_text", "prepare", "resolve_text"]
