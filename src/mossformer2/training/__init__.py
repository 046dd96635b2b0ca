"""Training: typed configs and the resumable Trainer (torchrun helpers: :mod:`mossformer2.distributed`).

``from mossformer2.training import Trainer, load_train_config``.
"""

from mossformer2.training.config import TrainConfig, load_train_config, save_train_config
from mossformer2.training.trainer import Trainer, TrainState

__all__ = ["TrainConfig", "TrainState", "Trainer", "load_train_config", "save_train_config"]
