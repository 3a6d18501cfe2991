"""Test set-up: the recipes' sibling modules (``local_corpus``, ``digits``, ``_common``) import the way
the recipes import them, from the ``recipes/`` folder."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine OpenMP oversubscription
    makes every small matmul milliseconds slow. Restores the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
