"""The package as a library: what `import mossformer2` shows (dir, lazy submodules), stays light, and ships."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mossformer2
from tests.conftest import REPO_ROOT


def _fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter (no module imported yet) and return the JSON it prints."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_dir_lists_the_public_names_and_submodules():
    names = dir(mossformer2)
    assert set(mossformer2.__all__) <= set(names)
    assert {"load_model", "Separator", "build_model", "losses", "metrics", "export", "hub", "runtime",
            "data", "separation"} <= set(names)
    assert not {"Any", "TYPE_CHECKING", "annotations"} & set(names)


def test_submodules_are_attributes_after_a_bare_import_which_stays_light():
    out = _fresh_python(
        "import json, sys, mossformer2\n"
        "names = dir(mossformer2)\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'matplotlib', 'huggingface_hub') "
        "if m in sys.modules)\n"
        "hub = mossformer2.hub.resolve_checkpoint.__module__\n"
        "light = sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules)\n"
        "losses = mossformer2.losses.pit_si_sdr_loss.__module__\n"
        "print(json.dumps({'heavy': heavy, 'hub': hub, 'light': light, 'losses': losses,"
        " 'data': mossformer2.data.__name__}))")
    assert out["heavy"] == [] and out["light"] == []  # neither the import nor dir() nor hub pulls in torch
    assert out["hub"] == "mossformer2.hub" and out["losses"] == "mossformer2.losses"
    assert out["data"] == "mossformer2.data"


def test_unknown_attributes_are_still_attribute_errors():
    try:
        mossformer2.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no attribute 'no_such_thing'" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_a_py_typed_marker_ships_with_the_package():
    package = Path(mossformer2.__file__).parent
    assert (package / "py.typed").is_file()
    # The package-data line of pyproject.toml (tomllib is Python 3.11+; the package supports 3.10).
    section = (REPO_ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    line = next(line for line in section.splitlines() if line.startswith("mossformer2 = "))
    assert '"py.typed"' in line
