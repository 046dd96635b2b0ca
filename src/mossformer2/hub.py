"""Resolve a checkpoint reference: a local file, a local folder, or a Hugging Face hub id.

Hub downloads use ``huggingface_hub`` and fall back to its local cache when offline (``HF_HUB_OFFLINE=1``) or when
the network is unreachable; a miss says how to fetch the file on another machine.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import urllib.parse
import urllib.request
from pathlib import Path

from mossformer2.utils import is_onnx_path, is_torchscript_name

HUB_FILENAME = "last_best_checkpoint.pt"
POINTER_FILE = "last_best_checkpoint"
# A trainer's experiment folder: the best validated weights and the latest training state (training.trainer).
TRAINER_BEST, TRAINER_LAST = "best.pt", "last.pt"
# Short names accepted by ``--model``; "default" is the model shipped inside the package.
KNOWN_MODELS = {"mossformer2_ss_16k": "alibabasglab/MossFormer2_SS_16K"}
BUILTIN_NAMES = ("default", "builtin", "built-in")
_FILE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".onnx", ".safetensors"}
# owner/name, optionally @revision (a commit, tag or branch: a pinned download, e.g. owner/name@3f5a2c1)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def model_name_to_ref(name: str) -> str | None:
    """``--model NAME`` -> checkpoint reference: None for the shipped model, else a hub id."""
    if name.lower() in BUILTIN_NAMES:
        return None
    if name.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[name.lower()]
    if _HUB_ID.match(name):
        return name
    raise ValueError(f"unknown model {name!r}: use 'default' (the built-in model), one of "
                     f"{sorted(v.split('/')[1] for v in KNOWN_MODELS.values())}, or a hub id like OWNER/NAME")


def is_model_name(ref: object) -> bool:
    """A short model name (``"default"``, ``"MossFormer2_SS_16K"``) that names no local file or folder."""
    return (isinstance(ref, str) and ref.lower() in (*BUILTIN_NAMES, *KNOWN_MODELS)
            and not Path(ref).exists())


def model_checkpoint(name: str, filename: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """``--model NAME`` -> its checkpoint file: the shipped one for 'default', else the hub download (cached;
    ``filename`` / ``cache_dir`` as in :func:`resolve_checkpoint`)."""
    ref = model_name_to_ref(name)
    if ref is None:
        if filename is not None:
            raise ValueError(f"filename={filename!r} picks a file in a folder or hub repository; the built-in "
                             f"model {name!r} is one file")
        from mossformer2.pretrained import default_model_path

        return default_model_path()
    return _download_from_hub(ref, filename or HUB_FILENAME, cache_dir)  # a name is no local path: hub only


def checkpoint_path(ref: str | Path, filename: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Any checkpoint reference -> its file: a model name (:func:`model_checkpoint`), else a file, a folder or a
    hub id (:func:`resolve_checkpoint`). A TorchScript export (``*.ts.pt``) is taken only as the file named
    itself: one found in a folder or a hub repository (a pointer file, ``filename=``) is a program nobody chose
    to run."""
    path = (model_checkpoint(str(ref), filename, cache_dir) if is_model_name(ref)
            else resolve_checkpoint(ref, filename, cache_dir))
    if is_torchscript_name(path) and not Path(os.path.expanduser(str(ref))).is_file():
        raise ValueError(f"{path}, found through {str(ref)!r}, is a TorchScript export: a program from a hub "
                         "repository or a folder is never run; if you trust its source, pass the file itself")
    return path


def is_hub_id(ref: object) -> bool:
    """A ``str`` ``owner/name`` that is not a local path (nothing there, no checkpoint suffix, owner not a local
    folder); a ``Path`` always names a local file or folder."""
    if not isinstance(ref, str) or not _HUB_ID.match(ref):
        return False
    path = Path(ref)
    return not path.exists() and path.suffix.lower() not in _FILE_SUFFIXES and not path.parent.is_dir()


def resolve_checkpoint(ref: str | Path, filename: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path of a checkpoint file given a file, a folder or a hub id (``owner/name``).

    ``filename``: the file to take from a folder or hub repository (default: a folder's pointer file
    ``last_best_checkpoint`` or its ``last_best_checkpoint.pt``, else a trainer's ``best.pt`` where it sits
    beside ``last.pt`` only, else the folder's only ``*.pt`` / ``*.pth`` / ``*.ckpt`` (TorchScript ``*.ts.pt``
    left out); ``last_best_checkpoint.pt`` on the hub).
    """
    path = Path(os.path.expanduser(ref))
    if path.is_file():
        return path
    if path.is_dir():
        return _checkpoint_in_folder(path, filename)
    if is_hub_id(ref):  # a str only: a Path object is a path
        try:
            return _download_from_hub(str(ref), filename or HUB_FILENAME, cache_dir)
        except FileNotFoundError as err:  # a mistyped local path looks like owner/name too: name both readings
            raise FileNotFoundError(f"no file or folder {ref} here (if you meant a local checkpoint, check the "
                                    f"path), and as a hub id: {err}") from None
    raise FileNotFoundError(f"checkpoint not found: {ref} (expected a .pt file, a folder holding one, or a "
                            f"hub id like {KNOWN_MODELS['mossformer2_ss_16k']})")


def _checkpoint_in_folder(folder: Path, filename: str | None = None) -> Path:
    """``filename`` if given; official layout: a pointer file ``last_best_checkpoint`` naming the file; else the
    official file name, a trainer's ``best.pt`` (validated weights) beside its ``last.pt``, or the only ``*.pt``
    / ``.pth`` / ``.ckpt`` (not a ``*.ts.pt`` export)."""
    if filename is not None:
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"no {filename} in folder {folder} (filename={filename!r})")
        return folder / filename
    pointer = folder / POINTER_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = (folder / name) if name else folder / HUB_FILENAME
        if not target.is_file():
            raise FileNotFoundError(f"{pointer} names {name!r}, which does not exist in {folder}")
        return target
    # TorchScript exports (*.ts.pt) are programs, never run from a folder: no candidates, nor a reason to refuse.
    # .pth / .ckpt files count only in a folder without .pt ones (a trainer's folder with a copied-in init.pth).
    files = [f for f in folder.iterdir() if f.is_file() and not is_torchscript_name(f)]
    candidates = (sorted(f for f in files if f.suffix.lower() == ".pt")
                  or sorted(f for f in files if f.suffix.lower() in (".pth", ".ckpt")))
    if (folder / HUB_FILENAME).is_file():
        return folder / HUB_FILENAME
    if len(candidates) == 1:
        return candidates[0]
    if {c.name for c in candidates} == {TRAINER_BEST, TRAINER_LAST}:
        return folder / TRAINER_BEST
    if not candidates:
        exports = sorted(f.name for f in folder.glob("*") if is_torchscript_name(f) or is_onnx_path(f))
        also = (f" (exports such as {exports[0]} are not taken from a folder: pass the file)" if exports else "")
        raise FileNotFoundError(f"no checkpoint (*.pt, *.pth, *.ckpt or '{POINTER_FILE}' pointer file) in folder "
                                f"{folder}{also}")
    raise ValueError(f"several checkpoints in {folder} ({', '.join(c.name for c in candidates)}): pass the file "
                     "itself (on the command line: --checkpoint PATH; in Python: its path, or "
                     "Separator.from_pretrained(folder, filename=NAME))")


def _cache_dir_from_env() -> str | None:
    # Read at call time (huggingface_hub reads its env once at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _unresolvable_hub_host() -> str | None:
    """The hub's host name when it cannot be resolved and no proxy is set, else None.

    huggingface_hub retries a failed name lookup for about 24 s before giving up; a machine without DNS (an
    offline one) never gets an answer, so the network try is skipped there. With a proxy the proxy resolves it.
    """
    from huggingface_hub import constants

    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    if proxies.get(endpoint.scheme) or proxies.get("all"):  # the proxy for the endpoint's own scheme
        return None
    host = endpoint.hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return host
    return None


def _download_from_hub(ref: str, filename: str, cache_dir: str | Path | None) -> Path:
    """``ref``: ``owner/name`` or ``owner/name@revision``."""
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = ref.partition("@")
    if revision:
        hf_hub_download = functools.partial(hf_hub_download, revision=revision)
    cache = str(cache_dir) if cache_dir is not None else _cache_dir_from_env()
    pin = f" --revision {revision}" if revision else ""
    how_to = (f"on a machine with internet run `hf download {repo_id} {filename}{pin}` (huggingface_hub >= 0.34; "
              f"`huggingface-cli download` before 1.0) or download it from https://huggingface.co/{repo_id}, "
              "copy the file here and pass its path (ref= in Python, --checkpoint PATH on the command line)")
    online_error: Exception | None = None
    offline = _offline()
    unresolved = None if offline else _unresolvable_hub_host()
    if not offline and unresolved is None:
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache))
        except Exception as err:  # network down, repo missing, ...: try the local cache before giving up
            online_error = err
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=True))
    except Exception:
        if unresolved is not None:
            reason = f"the hub's host {unresolved} cannot be resolved (no network?), so no download was tried"
        elif offline:
            reason = "offline mode (HF_HUB_OFFLINE=1)"
        else:  # huggingface_hub retries an unreachable hub for about 24 s before this
            first_line = str(online_error).splitlines()[0] if str(online_error) else type(online_error).__name__
            reason = (f"download failed: {first_line} (on a machine without internet, HF_HUB_OFFLINE=1 skips the "
                      "network tries)")
        raise FileNotFoundError(f"{repo_id}/{filename}{f' at revision {revision}' if revision else ''} is not in "
                                f"the local Hugging Face cache "
                                f"({cache or 'default cache'}) and {reason}; {how_to}") from None
