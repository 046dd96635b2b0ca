"""data/loaders.py: what the training loader refuses, its order, and the validation length cap."""

from __future__ import annotations

import pytest

from mossformer2.data.loaders import build_datasets, create_dataloaders, set_loader_epoch
from mossformer2.distributed import DistInfo
from tests.conftest import make_train_config


def test_a_training_set_smaller_than_one_batch_per_process_is_refused(train_corpus):
    """Under torchrun every process needs a whole batch: 3 examples do not make batch 2 x 2 processes."""
    cfg = make_train_config(train_corpus)  # data.batch_size=2
    with pytest.raises(ValueError, match=r"the training set has 3 examples, fewer than one batch \(2 x 2 processes\)"):
        create_dataloaders(cfg, DistInfo(rank=0, world_size=2), datasets=(list(range(3)), list(range(2))))
    create_dataloaders(cfg, DistInfo(rank=0, world_size=2), datasets=(list(range(4)), list(range(2))))


def test_the_training_order_follows_trainer_seed(train_corpus):
    orders = {}
    for seed in (3, 4):
        loader, _ = create_dataloaders(make_train_config(train_corpus, f"trainer.seed={seed}"), DistInfo(),
                                       datasets=(list(range(64)), list(range(2))))
        set_loader_epoch(loader, 0)
        orders[seed] = list(loader.sampler)
    assert sorted(orders[3]) == sorted(orders[4]) == list(range(64))
    assert orders[3] != orders[4]


def test_max_valid_seconds_also_caps_dynamic_mixing_validation_examples(train_corpus):
    # valid_max_seconds 0.25 (2000 samples) in make_train_config; data.max_valid_seconds 0.1 is the tighter cap
    _, valid = build_datasets(make_train_config(train_corpus, "data.max_valid_seconds=0.1"), progress=False)
    lengths = [valid[i]["mix"].shape[-1] for i in range(len(valid))]
    assert max(lengths) <= 800
    _, uncapped = build_datasets(make_train_config(train_corpus), progress=False)
    assert max(uncapped[i]["mix"].shape[-1] for i in range(len(uncapped))) > 800
