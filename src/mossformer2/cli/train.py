"""``mossformer2 train``: train or fine-tune a model from a YAML config (single process or under torchrun)."""

from __future__ import annotations

import argparse

from mossformer2.cli import user_path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train or fine-tune a model from a YAML config",
        description="Train MossFormer2 from a YAML config (examples: configs/ in the source repository). Resumes "
                    "from EXP_DIR/last.pt when it exists (changed optim.* settings then apply from there); "
                    "Ctrl-C or SIGTERM saves it after the current step. Override any config key with "
                    "key.sub=value, e.g. optim.lr=5e-5 data.batch_size=2. "
                    "Several GPUs or machines: torchrun --nproc_per_node=N -m mossformer2 train ...")
    parser.add_argument("--config", required=True, type=user_path,
                        help="YAML training config")
    parser.add_argument("--exp-dir", required=True, type=user_path,
                        help="experiment folder: checkpoints, logs, TensorBoard")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def run(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    import torch

    # Before any parallel torch op: CPU worker threads copy the flush-to-zero mode when the thread pool is
    # created, and subnormal floats otherwise slow CPU training down 10x or more as training goes on.
    torch.set_flush_denormal(True)
    from mossformer2.distributed import cleanup_distributed, init_distributed
    from mossformer2.training import Trainer, load_train_config
    from mossformer2.training.experiment import TrainingInterrupted
    from mossformer2.training.trainer import best_summary

    cfg = load_train_config(args.config, args.overrides)  # (the Trainer applies trainer.cpu_threads)
    exp_dir = Path(args.exp_dir)
    dist_info = init_distributed(cfg.trainer.device)
    try:
        trainer = Trainer(cfg, exp_dir, dist_info=dist_info)  # (data.synthetic: makes the corpus once locked)
        state = trainer.fit()
    except TrainingInterrupted as stop:  # SIGINT/SIGTERM: state saved after the current step (the log says where)
        if stop.signum == signal.SIGTERM:
            return 128 + signal.SIGTERM  # 143, as if the signal had ended the process
        raise  # SIGINT: the dispatcher prints "interrupted" and exits with 130
    finally:
        cleanup_distributed()
    if dist_info.is_main and trainer.stop_reason is not None:  # a step or time limit: not the end of the run
        print(f"stopped: {trainer.stop_summary()}; {best_summary(state)}")
    elif dist_info.is_main:
        print(f"done: epoch {state.epoch}, step {state.step}, {best_summary(state)}; checkpoints in {exp_dir}")
    return 0
