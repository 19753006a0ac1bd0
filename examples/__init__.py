"""Example models built in code (``examples/models.py``); importable as ``from examples import models``."""
