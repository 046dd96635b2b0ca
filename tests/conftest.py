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
