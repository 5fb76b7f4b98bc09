"""Helpers the tests import (tests/ is on pytest's ``pythonpath``): ``helpers.train`` for the training tests,
``helpers.images`` for random PNG files."""
