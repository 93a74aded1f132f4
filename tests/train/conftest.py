"""Tiny recipes built in-test: a random Llama teacher, synthetic documents, a few steps per stage."""

import pytest

from .tiny import tiny_recipe


@pytest.fixture
def recipe_factory():
    return tiny_recipe
