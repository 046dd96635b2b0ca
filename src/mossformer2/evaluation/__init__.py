"""Evaluation of separation checkpoints (``evaluate``) and creation of test mixtures (``mixing``)."""

from __future__ import annotations

from mossformer2.evaluation.evaluate import evaluate, format_table, load_mixture
from mossformer2.evaluation.mixing import (
    MixtureSpec,
    active_level,
    create_mixtures,
    mix_waves,
    plan_from_files,
    plan_from_recipe,
    plan_from_speaker_folder,
)

__all__ = ["MixtureSpec", "active_level", "create_mixtures", "evaluate", "format_table", "load_mixture",
           "mix_waves", "plan_from_files", "plan_from_recipe", "plan_from_speaker_folder"]
