"""Shared fixtures: a private model cache with the toy pair prepared once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fedgt_cache(tmp_path_factory):
    """Point $FEDGT_CACHE at a fresh folder for the whole session."""
    path = tmp_path_factory.mktemp("fedgt_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDGT_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def toy_pair(fedgt_cache):
    """The toy TinyLM/LLM pair, pretrained for a few steps (seconds) into the session cache."""
    from fedgt.provider.pretrain import prepare_preset

    return prepare_preset("toy", progress=False), prepare_preset("toy-large", progress=False)
