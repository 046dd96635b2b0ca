"""Checkpoint resolution: files, folders, hub ids through a fake local Hugging Face cache (no network)."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest

from mossformer2 import build_model, load_model, save_checkpoint
from mossformer2.hub import is_hub_id, model_name_to_ref, resolve_checkpoint
from mossformer2.separation import Separator
from tests.conftest import make_tiny_config

REPO = "alibabasglab/MossFormer2_SS_16K"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hf_cache(hf_home, tmp_path, repo_id: str = REPO):
    """Lay out ``HF_HOME/hub/models--owner--name/{refs/main, snapshots/<commit>/last_best_checkpoint.pt}``."""
    model = build_model(make_tiny_config())
    folder = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    save_checkpoint(snapshot / "last_best_checkpoint.pt", model)
    return model, snapshot / "last_best_checkpoint.pt"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    model, path = fake_hf_cache(hf_home, tmp_path)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model, path


def test_local_file_and_folder_layouts(tmp_path, monkeypatch):
    model = build_model(make_tiny_config())
    ckpt = tmp_path / "exp" / "model.ckpt-3-100.pt"
    save_checkpoint(ckpt, model)
    assert resolve_checkpoint(ckpt) == ckpt
    assert resolve_checkpoint(str(ckpt)) == ckpt
    assert resolve_checkpoint(tmp_path / "exp") == ckpt  # the only *.pt
    save_checkpoint(tmp_path / "exp" / "model.ckpt-4-200.pt", model)
    with pytest.raises(ValueError, match="several checkpoints"):
        resolve_checkpoint(tmp_path / "exp")
    (tmp_path / "exp" / "last_best_checkpoint").write_text("model.ckpt-3-100.pt\n")  # official pointer file
    assert resolve_checkpoint(tmp_path / "exp") == ckpt
    (tmp_path / "exp" / "last_best_checkpoint").write_text("gone.pt")
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        resolve_checkpoint(tmp_path / "exp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nothing_here.pt")
    # A relative path that looks like owner/name is still a path when it names a file or a local folder.
    monkeypatch.chdir(tmp_path)
    for ref in ["exp/missing.pt", "exp/missing", "empty/x"]:
        assert not is_hub_id(ref)
        with pytest.raises(FileNotFoundError, match="checkpoint not found"):
            resolve_checkpoint(ref)
    assert is_hub_id("alibabasglab/MossFormer2_SS_16K")
    # A Path object is a path: a missing one fails at once, never a 27 s detour over the network to the hub.
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_checkpoint(Path("someone") / "their_model")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(Path("someone") / "their_model")


def test_hub_id_offline_uses_local_cache(offline_cache):
    model, cached = offline_cache
    path = resolve_checkpoint(REPO)
    assert path.resolve() == cached.resolve()
    loaded = load_model(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.shape == b.shape and bool((a == b).all()), name


def test_hub_offline_miss_says_how_to_get_the_file(offline_cache):
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint("someone/NotCached")
    message = str(info.value)
    assert "hf download someone/NotCached last_best_checkpoint.pt" in message
    assert "--checkpoint PATH" in message and "HF_HUB_OFFLINE" in message


def test_a_mistyped_local_path_is_named_as_both_readings(offline_cache, tmp_path, monkeypatch):
    """`checkpoint/MossFormer2_SS_16K` for the folder `checkpoints/...` looks like a hub id; the error named only
    the hub cache, never that no such local file or folder exists."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "MossFormer2_SS_16K").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint("checkpoint/MossFormer2_SS_16K")
    message = str(info.value)
    assert message.startswith("no file or folder checkpoint/MossFormer2_SS_16K here (if you meant a local "
                              "checkpoint, check the path), and as a hub id: checkpoint/MossFormer2_SS_16K/"
                              "last_best_checkpoint.pt is not in the local Hugging Face cache"), message
    assert "offline mode (HF_HUB_OFFLINE=1)" in message
    # A model name is no path the user typed: its miss speaks of the hub only.
    with pytest.raises(FileNotFoundError) as info:
        Separator.from_pretrained("MossFormer2_SS_16K", cache_dir=tmp_path)  # an empty cache
    assert str(info.value).startswith("alibabasglab/MossFormer2_SS_16K/last_best_checkpoint.pt is not in the "
                                      "local Hugging Face cache"), str(info.value)


@pytest.fixture
def resolvable_hub(monkeypatch):
    """Name lookups succeed (this machine and CI have no DNS), so the download itself is what gets faked."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))])


def test_network_failure_falls_back_to_cache(offline_cache, resolvable_hub, monkeypatch):
    _, cached = offline_cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    real_download = huggingface_hub.hf_hub_download
    calls = []

    def no_network(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only"):
            raise ConnectionError("network unreachable")
        return real_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    assert resolve_checkpoint(REPO).resolve() == cached.resolve()
    assert calls == [False, True]  # tried the hub first, then the cache
    with pytest.raises(FileNotFoundError, match="download failed: network unreachable .*HF_HUB_OFFLINE=1 skips"):
        resolve_checkpoint("someone/NotCached")


def test_an_unresolvable_hub_host_skips_the_network_tries(offline_cache, monkeypatch):
    """Without DNS, huggingface_hub retried the lookup for ~24 s per file before using the cache."""
    _, cached = offline_cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    lookups, downloads = [], []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    real_download = huggingface_hub.hf_hub_download

    def download(*args, **kwargs):
        downloads.append(kwargs.get("local_files_only", False))
        return real_download(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve_checkpoint(REPO).resolve() == cached.resolve()
    # The cache only (huggingface_hub itself may look the host up again for its user-agent header).
    assert lookups[0] == "huggingface.co" and downloads == [True]
    with pytest.raises(FileNotFoundError, match="the hub's host huggingface.co cannot be resolved .*no download"):
        resolve_checkpoint("someone/NotCached")
    assert downloads == [True, True]
    # Behind a proxy the proxy resolves the name: the download is tried.
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    with pytest.raises(FileNotFoundError, match="download failed"):
        resolve_checkpoint("someone/NotCached")
    assert downloads[2:] == [False, True]


def test_online_download_path_is_used_when_available(tmp_path, resolvable_hub, monkeypatch):
    target = tmp_path / "downloaded.pt"
    save_checkpoint(target, build_model(make_tiny_config()))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = {}

    def fake_download(repo_id, filename, cache_dir=None, local_files_only=False):
        seen.update(repo_id=repo_id, filename=filename, local=local_files_only)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_checkpoint(REPO) == target
    assert seen == {"repo_id": REPO, "filename": "last_best_checkpoint.pt", "local": False}


def test_model_names():
    assert model_name_to_ref("default") is None
    assert model_name_to_ref("MossFormer2_SS_16K") == REPO
    assert model_name_to_ref("me/MyModel") == "me/MyModel"
    with pytest.raises(ValueError, match="unknown model"):
        model_name_to_ref("no such model")
    from mossformer2.hub import model_checkpoint
    from mossformer2.pretrained import default_model_path

    assert model_checkpoint("default") == default_model_path()  # `info --model` reads names as `separate` does


def test_separator_from_pretrained_hub_id_offline(offline_cache):
    model, _ = offline_cache
    wave = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
    out = Separator.from_pretrained(REPO, device="cpu").separate(wave, 16000)
    np.testing.assert_allclose(out, Separator(model, device="cpu").separate(wave, 16000), atol=1e-6)


def test_a_hub_id_pins_a_revision_with_at(tmp_path, monkeypatch):
    """`owner/name@rev` was "checkpoint not found": no download could be pinned to a commit (reproducibility,
    and a repository changed under the same name)."""
    hf_home = tmp_path / "hf"
    _, main_file = fake_hf_cache(hf_home, tmp_path)
    pinned_commit = "b" * 40
    pinned = main_file.parents[1] / pinned_commit / "last_best_checkpoint.pt"
    save_checkpoint(pinned, build_model(make_tiny_config(num_spks=3)))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint(REPO) == main_file
    assert resolve_checkpoint(f"{REPO}@{pinned_commit}") == pinned
    assert Separator.from_pretrained(f"{REPO}@{pinned_commit}", device="cpu").num_spks == 3
    assert model_name_to_ref(f"{REPO}@v1.0") == f"{REPO}@v1.0"
    with pytest.raises(FileNotFoundError, match=rf"{REPO}/last_best_checkpoint.pt at revision {'c' * 40} is not in "
                                                 rf"the local Hugging Face cache .*--revision {'c' * 40}"):
        resolve_checkpoint(f"{REPO}@{'c' * 40}")


def test_a_folder_takes_filename_and_prefers_a_trainers_best_pt(tmp_path):
    """``filename=`` was ignored for local folders, and a trainer's experiment folder (best.pt + last.pt) was
    refused as ambiguous."""
    model = build_model(make_tiny_config())
    exp = tmp_path / "exp"
    save_checkpoint(exp / "best.pt", model)
    save_checkpoint(exp / "last.pt", model)
    assert resolve_checkpoint(exp) == exp / "best.pt"
    assert resolve_checkpoint(exp, filename="last.pt") == exp / "last.pt"
    (exp / "model.ts.pt").write_bytes(b"a TorchScript export beside them: never run from a folder, not a choice")
    assert resolve_checkpoint(exp) == exp / "best.pt"
    (exp / "init.pth").write_bytes(b"weights copied in: .pth files count only where no .pt file is")
    assert resolve_checkpoint(exp) == exp / "best.pt"
    other = tmp_path / "pth"  # .pth and .ckpt files are checkpoints too
    save_checkpoint(other / "weights.pth", model)
    assert resolve_checkpoint(other) == other / "weights.pth"
    only_export = tmp_path / "export"
    only_export.mkdir()
    (only_export / "m.ts.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"exports such as m.ts.pt are not taken from a folder: pass the"):
        resolve_checkpoint(only_export)
    (only_export / "m.ts.pt").rename(only_export / "m.onnx")  # an ONNX export: the same hint (none before)
    with pytest.raises(FileNotFoundError, match=r"exports such as m.onnx are not taken from a folder: pass the"):
        resolve_checkpoint(only_export)
    assert Separator.from_pretrained(exp, device="cpu").num_spks == 2
    with pytest.raises(FileNotFoundError, match=r"no other.pt in folder .*exp \(filename='other.pt'\)"):
        resolve_checkpoint(exp, filename="other.pt")
    save_checkpoint(exp / "epoch3.pt", model)  # no longer just the trainer's pair: ambiguous
    with pytest.raises(ValueError, match=r"several checkpoints .*--checkpoint PATH.*"
                                         r"Separator\.from_pretrained\(folder, filename=NAME\)"):
        resolve_checkpoint(exp)
    assert resolve_checkpoint(exp, filename="epoch3.pt") == exp / "epoch3.pt"
    # The advice works: from_pretrained takes filename= (it went to Separator() and failed with a TypeError).
    assert Separator.from_pretrained(exp, device="cpu", filename="epoch3.pt", chunk_seconds=5).chunk == 5 * 16000
    with pytest.raises(ValueError, match="the built-in model 'default' is one file"):
        Separator.from_pretrained("default", filename="best.pt")


def test_load_model_takes_what_from_pretrained_takes(tmp_path, monkeypatch):
    """load_model, the README's first call, refused model names, hub ids and folders ("checkpoint not found")."""
    from mossformer2.pretrained import default_model_path

    builtin = load_model(default_model_path())
    assert load_model("default").config == builtin.config
    exp = tmp_path / "exp"
    save_checkpoint(exp / "best.pt", builtin)
    save_checkpoint(exp / "last.pt", build_model(make_tiny_config()))
    assert load_model(exp).config == builtin.config  # the trainer's best.pt
    hub_file = tmp_path / "downloaded.pt"
    save_checkpoint(hub_file, builtin)
    asked = []
    monkeypatch.setattr("mossformer2.hub._download_from_hub",
                        lambda repo, filename, cache: asked.append((repo, filename)) or hub_file)
    assert load_model("MossFormer2_SS_16K").config == builtin.config
    assert load_model("someone/their_model").config == builtin.config
    assert asked == [("alibabasglab/MossFormer2_SS_16K", "last_best_checkpoint.pt"),
                     ("someone/their_model", "last_best_checkpoint.pt")]


def test_the_cli_prints_each_hub_warning_once():
    """huggingface_hub logs through a handler of its own; the CLI's root handler printed each retry again."""
    import subprocess
    import sys

    script = ("from huggingface_hub.utils import logging as hf_logging\n"
              "from mossformer2.cli import main\n"
              "main(['info', '--model', 'default'])\n"
              "hf_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Retrying in 1s") == 1, out.stderr


def _hub_without_dns(monkeypatch, endpoint: str) -> None:
    """The hub at ``endpoint``, no proxy set, and every DNS lookup failing."""
    from huggingface_hub import constants

    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror("no DNS")))


def test_a_proxy_for_the_endpoints_own_scheme_counts(monkeypatch):
    """An http:// endpoint behind http_proxy: the DNS shortcut must not call its host unreachable."""
    from mossformer2.hub import _unresolvable_hub_host

    _hub_without_dns(monkeypatch, "http://mirror.internal:8080")
    assert _unresolvable_hub_host() == "mirror.internal"
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")  # another scheme's proxy: no help
    assert _unresolvable_hub_host() == "mirror.internal"
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    assert _unresolvable_hub_host() is None


def test_an_empty_pointer_file_names_the_official_file(tmp_path):
    """ClearVoice's ``last_best_checkpoint`` pointer written empty: the official ``last_best_checkpoint.pt``."""
    (tmp_path / "last_best_checkpoint").write_text("\n")
    (tmp_path / "last_best_checkpoint.pt").write_bytes(b"x")
    (tmp_path / "epoch3.pt").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path) == tmp_path / "last_best_checkpoint.pt"


def test_the_official_file_name_wins_among_several_checkpoints(tmp_path):
    """No pointer file: ``last_best_checkpoint.pt`` beside other ``*.pt`` files is the one taken, not 'several'."""
    for name in ("epoch1.pt", "last_best_checkpoint.pt", "epoch2.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert resolve_checkpoint(tmp_path) == tmp_path / "last_best_checkpoint.pt"


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_every_spelling_of_hf_hub_offline_is_offline(monkeypatch, value):
    from mossformer2.hub import _offline

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert _offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not _offline()


def test_all_proxy_counts_as_a_proxy_for_the_hub(monkeypatch):
    """Behind ``all_proxy`` the proxy resolves the hub's host: no DNS shortcut that skips the download."""
    from mossformer2.hub import _unresolvable_hub_host

    _hub_without_dns(monkeypatch, "https://hub.internal")
    assert _unresolvable_hub_host() == "hub.internal"
    monkeypatch.setenv("all_proxy", "http://proxy.invalid:3128")
    assert _unresolvable_hub_host() is None


def test_offline_mode_never_tries_the_network(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1: only the local cache is asked (local_files_only=True), never a download."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, cache_dir=None, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint("someone/their_model") == tmp_path / "last_best_checkpoint.pt"
    assert calls == [True]
