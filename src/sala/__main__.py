"""``python -m sala``: the ``sala`` command line."""

from .cli import app

app()
