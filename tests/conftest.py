"""Shared test fixtures: tiny model configs and the reference fixture location."""

from __future__ import annotations

import os

# Tests use tiny models: one intra-op thread per process avoids OpenMP oversubscription (DDP tests run two
# processes; on 2 shared cores, 2 threads each made the suite over 10x slower). Set before torch starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mossformer2 import MossFormer2Config  # noqa: E402
from mossformer2.models.config import tiny_test_config  # noqa: E402

torch.set_num_threads(1)

# A shell starts background jobs with SIGINT ignored (`pytest &`), and Python then installs no KeyboardInterrupt
# handler: the tests of Ctrl-C during training need the default one, as in a terminal.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str):
    """Import a script of the repository that is not in the package (a recipe, a benchmark) as a module."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def reference_dir() -> Path | None:
    """``../shared/reference`` beside the checkout (or $MOSSFORMER2_REFERENCE_DIR)."""
    candidates = [os.environ.get("MOSSFORMER2_REFERENCE_DIR"), REPO_ROOT.parent / "shared" / "reference"]
    for cand in candidates:
        if cand and (Path(cand) / "fixture_small_A.pt").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def reference() -> Path:
    """The full reference folder: only the checks of the copies in tests/fixtures and the intermediate activations
    need it (the outputs and the key list travel with the tests)."""
    path = reference_dir()
    if path is None:
        pytest.skip("reference fixtures not found (expected ../shared/reference or $MOSSFORMER2_REFERENCE_DIR)")
    return path


def make_tiny_config(**changes) -> MossFormer2Config:
    """A few-thousand-parameter config that exercises every code path quickly."""
    return tiny_test_config(**changes)


def seeded_tiny_model():
    """The tiny model with seed-0 weights: the same weights wherever a test file builds it."""
    from mossformer2 import build_model

    torch.manual_seed(0)
    return build_model(make_tiny_config()).eval()


# The training tests' model (8 kHz) and config: a synthetic corpus of 5 speakers, a few steps per epoch.
TRAIN_TINY_MODEL = dict(encoder_embedding_dim=16, mossformer_sequence_dim=16, num_mossformer_layer=1,
                        query_key_dim=16, rotary_dim=8, fsmn_inner_dim=16, fsmn_lorder=4, group_size=64,
                        sample_rate=8000, encoder_kernel_size=16)


@pytest.fixture(scope="module")
def train_corpus(tmp_path_factory):
    """A synthetic training corpus (5 speakers x 2 utterances of 0.5 s at 8 kHz): its dynamic-mixing settings."""
    from mossformer2.data.loaders import prepare_synthetic_data
    from mossformer2.training.config import train_config_from_dict

    root = tmp_path_factory.mktemp("synthetic")
    base = train_config_from_dict({"model": TRAIN_TINY_MODEL, "data": {
        "sample_rate": 8000, "synthetic": True, "synthetic_speakers": 5, "synthetic_utterances": 2,
        "synthetic_seconds": 0.5}})
    return prepare_synthetic_data(base, root).data.dynamic_mixing


def make_train_config(corpus, *overrides: str):
    """A TrainConfig on ``corpus`` (:func:`train_corpus`): 8 batches of 2 per epoch, 2 epochs, CPU, with
    ``overrides`` (``key=value``) applied."""
    from mossformer2.config_utils import apply_overrides
    from mossformer2.training.config import train_config_from_dict

    data = {
        "model": {**TRAIN_TINY_MODEL, "dropout": 0.1},
        "data": {"sample_rate": 8000, "segment_seconds": 0.2, "batch_size": 2, "valid_batch_size": 2,
                 "num_workers": 0, "cache_audio": True,
                 "dynamic_mixing": {"train_utterances": corpus.train_utterances,
                                    "valid_utterances": corpus.valid_utterances, "examples_per_epoch": 16,
                                    "valid_examples": 2, "valid_max_seconds": 0.25,
                                    "speed_perturb": [0.9, 1.1]}},
        "optim": {"lr": 1e-3, "accum_steps": 2},
        "trainer": {"max_epochs": 2, "seed": 3, "device": "cpu", "checkpoint_every_steps": 3,
                    "log_every_steps": 1, "progress_bar": False, "tensorboard": False, "audio_examples": 0},
    }
    return train_config_from_dict(apply_overrides(data, list(overrides)))


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A dynamic-length ONNX export of :func:`seeded_tiny_model`, made once for the session (~12 s)."""
    from mossformer2.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return export_onnx(seeded_tiny_model(), path, dynamic_length=True, example=0.1 * torch.randn(2, 1000))


@pytest.fixture
def tiny_config() -> MossFormer2Config:
    return make_tiny_config()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def torch_blocked_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess in which ``import torch`` fails as if torch were not installed (the README's
    ONNX-only deployment): a ``sitecustomize`` on PYTHONPATH puts a finder in front that refuses torch."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
