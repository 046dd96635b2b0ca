"""Shared test fixtures: tiny model configs and the reference fixture location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mossformer2 import MossFormer2Config

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path | None:
    """``../shared/reference`` beside the checkout (or $MOSSFORMER2_REFERENCE_DIR)."""
    candidates = [os.environ.get("MOSSFORMER2_REFERENCE_DIR"), REPO_ROOT.parent / "shared" / "reference"]
    for cand in candidates:
        if cand and (Path(cand) / "fixture_small_A.pt").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def reference() -> Path:
    path = reference_dir()
    if path is None:
        message = "reference fixtures not found (expected ../shared/reference or $MOSSFORMER2_REFERENCE_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def make_tiny_config(**changes) -> MossFormer2Config:
    """A few-thousand-parameter config that exercises every code path quickly."""
    base = dict(encoder_embedding_dim=16, mossformer_sequence_dim=16, num_mossformer_layer=1,
                query_key_dim=16, rotary_dim=8, fsmn_inner_dim=16, fsmn_lorder=4, group_size=64)
    base.update(changes)
    return MossFormer2Config(**base)


@pytest.fixture
def tiny_config() -> MossFormer2Config:
    return make_tiny_config()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
