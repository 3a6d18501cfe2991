"""Test set-up: the recipes' sibling modules (``local_corpus``, ``digits``, ``_common``) import the way
the recipes import them, from the ``recipes/`` folder."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
