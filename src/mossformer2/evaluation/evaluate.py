"""Evaluation runner: manifest -> Separator -> PIT-aligned metrics -> ``per_utterance.csv`` + ``summary.json``.

``per_utterance.csv`` gets one row per mixture as soon as it is scored (appended and flushed to disk), so an
interrupted run loses at most the mixture in progress. Re-running with the same output folder skips the
mixtures already scored and retries the failed ones. Failed mixtures (unreadable files, mismatched lengths or
sample rates, speaker-count mismatches, a silent or multi-channel reference, ...) are rows with
``status=failed`` and the reason; the summary counts them next to every mean, so nothing is dropped silently. A
metric undefined on one mixture only (PESQ of a silent estimate, STOI of under ~0.4 s of speech) leaves that
cell empty, with the reason in ``error``; the row keeps ``status=ok`` and its other metrics, and the summary
lists it under ``incomplete`` (each column's mean states its own count). A multi-channel mixture is averaged to
mono (said once in the log).

A resumed run must use the same settings, the same weights included: ``info[WEIGHTS_KEY]`` (the SHA-256 of the
checkpoint file, see :func:`file_sha256`) is compared like every other setting.

CSV columns: ``id, duration_s``, each metric and its improvement over the mixture (``si_sdr, si_sdri, sdr,
sdri, pesq, stoi`` as selected), ``permutation`` (space-separated: output i of the separator is reference
speaker ``permutation[i]``, 0-based), ``status`` (ok | failed) and ``error``. SI-SDR is the zero-mean
definition of the official recipe; ``summary.json`` names the PESQ mode (``pesq_mode``: narrow band P.862 at
8 kHz, wide band P.862.2 otherwise).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mossformer2.config_utils import setting_changes
from mossformer2.data.manifests import MixtureEntry, load_manifest
from mossformer2.metrics import (
    METRICS,
    PESQ_MODES,
    check_metric_dependencies,
    parse_metrics,
    pesq_mode,
    score_separation,
)
from mossformer2.utils import atomic_write_text, bar_disabled, make_folder

CSV_NAME = "per_utterance.csv"
SUMMARY_NAME = "summary.json"
SETTINGS_NAME = "settings.json"
IMPROVED = {"si_sdr": "si_sdri", "sdr": "sdri"}  # metrics that also get an improvement column
# Settings that may change between a run and its resumption: the weights are identified by their SHA-256, not by
# how they were named or where the file was found (another working folder or Hugging Face cache).
RESUME_IGNORED = ("limit", "device", "checkpoint", "checkpoint_file")
WEIGHTS_KEY = "checkpoint_sha256"  # what identifies the weights: the same path may hold other weights later
UNKNOWN_PESQ_MODE = "the mixture file, scored by an earlier run, can no longer be read"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (a 670 MB checkpoint takes a few seconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def metric_columns(metrics: Sequence[str]) -> list[str]:
    """Score columns in CSV order: each metric followed by its improvement where there is one."""
    columns = []
    for name in metrics:
        columns.append(name)
        if name in IMPROVED:
            columns.append(IMPROVED[name])
    return columns


def csv_header(metrics: Sequence[str]) -> list[str]:
    return ["id", "duration_s", *metric_columns(metrics), "permutation", "status", "error"]


def load_mixture(entry: MixtureEntry) -> tuple[np.ndarray, np.ndarray, int]:
    """Read ``(mix [T], references [S, T], sample_rate)`` (mono), checking rates and lengths agree; a
    multi-channel mixture is averaged to mono, a multi-channel reference refused."""
    from mossformer2.audio import to_mono

    mix, refs, rate = _read_entry(entry)
    return to_mono(mix), refs, rate


def _read_entry(entry: MixtureEntry) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mix [C, T], mono references [S, T], sample_rate)``, checking channels, rates and lengths."""
    from mossformer2.audio import read_audio

    mix, rate = read_audio(entry.mix)
    refs = []
    for k, path in enumerate(entry.sources):
        source, source_rate = read_audio(path)
        if source.shape[0] > 1:  # e.g. both speakers in one file: averaging would score against half the mix
            raise ValueError(f"source {k + 1} ({path.name}) has {source.shape[0]} channels: a reference must be "
                             "one speaker in one channel (mono)")
        if source_rate != rate:
            raise ValueError(f"sample rates differ: mixture {rate} Hz, source {k + 1} ({path.name}) "
                             f"{source_rate} Hz")
        if source.shape[-1] != mix.shape[-1]:
            raise ValueError(f"lengths differ: mixture {mix.shape[-1]} samples, source {k + 1} ({path.name}) "
                             f"{source.shape[-1]} samples")
        refs.append(source[0])
    return mix, np.stack(refs), rate


def _read_previous_rows(csv_path: Path, header: list[str]) -> list[dict[str, str]]:
    """Rows of an earlier run; a last line cut off by a crash (no newline) is dropped."""
    text = csv_path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is not None and list(reader.fieldnames) != header:
        raise ValueError(f"{csv_path} was written with other columns ({', '.join(reader.fieldnames)}); "
                         "evaluate into a new --out folder or pass --overwrite to start again")
    return [row for row in reader if row.get("status") in ("ok", "failed")]


def _format_value(value: float) -> str:
    return f"{value:.4f}"


def summarize(rows: Sequence[dict[str, str]], metrics: Sequence[str]) -> dict[str, Any]:
    """Mean, median, std (population) and count of every score column over the scored rows."""
    scored = [r for r in rows if r["status"] == "ok"]
    stats: dict[str, Any] = {}
    for column in metric_columns(metrics):
        values = [float(r[column]) for r in scored if r[column] not in ("", "nan")]
        stats[column] = ({"mean": statistics.fmean(values), "median": statistics.median(values),
                          "std": statistics.pstdev(values), "count": len(values)} if values
                         else {"mean": None, "median": None, "std": None, "count": 0})
    return stats


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'metric':<8} {'mean':>9} {'median':>9} {'std':>9} {'count':>6}"]
    for name, s in summary["scores"].items():
        if s["count"]:
            lines.append(f"{name:<8} {s['mean']:>9.3f} {s['median']:>9.3f} {s['std']:>9.3f} {s['count']:>6d}")
        else:
            lines.append(f"{name:<8} {'-':>9} {'-':>9} {'-':>9} {0:>6d}")
    if summary.get("pesq_mode"):
        lines.append(f"pesq: {summary['pesq_mode']}")
    earlier = summary.get("num_skipped_already_scored", 0)
    kept = f" ({earlier} scored by an earlier run into this folder, kept)" if earlier else ""
    lines.append(f"scored {summary['num_scored']} of {summary['num_mixtures']} mixture(s){kept}; "
                 f"failed {summary['num_failed']}")
    lines += _first_ten("failed", summary["failed"])
    incomplete = summary.get("incomplete", [])
    if incomplete:
        lines.append(f"scored without some metric(s): {len(incomplete)} mixture(s)")
    lines += _first_ten("missing", incomplete)
    return "\n".join(lines)


def _first_ten(label: str, items: list[dict[str, str]]) -> list[str]:
    """``  label: id: error`` lines for the first ten items, then how many more the CSV holds."""
    lines = [f"  {label}: {item['id']}: {item['error']}" for item in items[:10]]
    if len(items) > 10:
        lines.append(f"  ... and {len(items) - 10} more (see {CSV_NAME})")
    return lines


def evaluate(separator: Any, data: str | Path | Sequence[MixtureEntry], out_dir: str | Path,
             metrics: str | Sequence[str] = METRICS, score_rate: int | None = None, limit: int | None = None,
             overwrite: bool = False, info: dict[str, Any] | None = None, progress: bool | None = True
             ) -> dict[str, Any]:
    """Separate and score every mixture of ``data`` (a manifest path or entries); returns the summary dict.

    ``separator``: anything with ``separate(wave [T], sample_rate) -> [S, T]`` and ``num_spks`` (a
    ``mossformer2.separation.Separator``). ``info``: extra provenance for ``summary.json`` (checkpoint, device,
    separator settings; ``WEIGHTS_KEY: file_sha256(checkpoint file)`` makes a resume check the weights too).
    Writes ``per_utterance.csv``, ``settings.json`` and ``summary.json`` into ``out_dir``.
    """
    names = parse_metrics(metrics)
    check_metric_dependencies(names)
    if score_rate is not None:
        from mossformer2.audio import check_sample_rate_option

        check_sample_rate_option(score_rate, "score_rate")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    entries = list(load_manifest(data) if isinstance(data, (str, Path)) else data)
    if limit is not None:
        entries = entries[:limit]
    if entries and len(entries[0].sources) != separator.num_spks:
        raise ValueError(f"the data has {len(entries[0].sources)} speakers per mixture but the model separates "
                         f"{separator.num_spks}")

    out_dir = make_folder(out_dir, "output folder")
    settings = {"data": str(Path(data).resolve()) if isinstance(data, (str, Path)) else f"{len(entries)} entries",
                "metrics": list(names), "score_rate": score_rate, "limit": limit, **(info or {})}
    header = csv_header(names)
    kept = _start_results(out_dir, settings, header, overwrite)
    done = {r["id"]: r for r in kept}
    todo = [e for e in entries if e.id not in done]
    model_rate = getattr(separator, "sample_rate", None)
    start = time.perf_counter()
    new_rows, rates = _score_all(separator, todo, names, score_rate, header, out_dir / CSV_NAME, model_rate,
                                 progress)
    elapsed = time.perf_counter() - start

    by_id = {**done, **{r["id"]: r for r in new_rows}}
    rows = [by_id[e.id] for e in entries]
    modes = _pesq_modes(entries, rows, rates, score_rate) if "pesq" in names else {}
    mode_names = sorted(set(modes.values()))
    scores = _scores(rows, names, modes)
    wanted = {e.id for e in entries}
    failed = [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "failed"]
    incomplete = [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "ok" and r["error"]]
    audio_seconds = sum(float(r["duration_s"]) for r in new_rows if r["status"] == "ok")
    summary = {
        "scores": scores,
        "num_mixtures": len(entries),
        "num_scored": sum(r["status"] == "ok" for r in rows),
        "num_failed": len(failed),
        "num_skipped_already_scored": len(wanted & set(done)),
        # rows an earlier run scored that this one does not cover (it has a smaller --limit): kept in the CSV
        "num_csv_rows_not_summarised": sum(r["id"] not in wanted for r in kept),
        "failed": failed,
        "num_incomplete": len(incomplete),
        "incomplete": incomplete,
        "seconds_evaluated_this_run": round(audio_seconds, 3),
        "real_time_factor_this_run": round(elapsed / audio_seconds, 4) if audio_seconds else None,
        "data": settings["data"],
        "checkpoint": settings.get("checkpoint"),
        "model_sample_rate": model_rate,
        **({"pesq_mode": "; ".join(f"{mode}: {PESQ_MODES.get(mode, UNKNOWN_PESQ_MODE)}" for mode in mode_names)}
           if "pesq" in names else {}),
        "settings": {k: v for k, v in settings.items() if k not in ("data", "checkpoint")},
    }
    atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


def _start_results(out_dir: Path, settings: dict[str, Any], header: list[str], overwrite: bool
                   ) -> list[dict[str, str]]:
    """Write ``settings.json`` and a CSV holding only the rows an earlier run scored with the same settings
    (its failures are retried, a cut-off last line dropped); those rows."""
    csv_path, settings_path = out_dir / CSV_NAME, out_dir / SETTINGS_NAME
    if overwrite:
        for path in (csv_path, settings_path, out_dir / SUMMARY_NAME):
            path.unlink(missing_ok=True)
    previous: list[dict[str, str]] = []
    if csv_path.exists():
        if settings_path.exists():
            _check_same_settings(out_dir, json.loads(settings_path.read_text(encoding="utf-8")), settings)
        previous = _read_previous_rows(csv_path, header)
    atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    kept = [r for r in previous if r["status"] == "ok"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(csv_path, buffer.getvalue())
    return kept


def _score_all(separator: Any, todo: Sequence[MixtureEntry], names: Sequence[str], score_rate: int | None,
               header: list[str], csv_path: Path, model_rate: int | None, progress: bool | None
               ) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Separate and score each mixture, appending its row to the CSV as it is done (synced: a killed run keeps
    its rows). ``(rows, {id: sample rate of each mixture scored})``."""
    from tqdm import tqdm

    rows: list[dict[str, str]] = []
    rates: dict[str, int] = {}  # for the PESQ mode
    downmixed = resampled = False
    with csv_path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        bar_off = True if not todo else bar_disabled(progress)  # None: only on a terminal
        for entry in tqdm(todo, desc="evaluating", unit="mix", disable=bar_off):
            row, channels, rate = _evaluate_one(separator, entry, names, score_rate, header)
            if row["status"] == "ok":
                rates[entry.id] = rate
                if rate != model_rate and model_rate and not resampled:
                    resampled = True
                    warnings.warn(f"mixture {entry.id} is at {rate} Hz, the model at {model_rate} Hz: mixtures are "
                                  "resampled for the model and scored at their own rate (said once)", stacklevel=3)
            if channels > 1 and not downmixed:
                downmixed = True
                warnings.warn(f"mixture {entry.id} has {channels} channels: multi-channel mixtures are averaged "
                              "to mono before separation and scoring (said once)", stacklevel=3)
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
            rows.append(row)
    return rows, rates


def _scores(rows: Sequence[dict[str, str]], names: Sequence[str], modes: dict[str, str]) -> dict[str, Any]:
    """The summary's scores; PESQ per mode (``pesq_nb``, ``pesq_wb``) where the mixtures' rates mix narrow and
    wide band, which are two scales: no one mean of both."""
    scores = summarize(rows, names)
    mode_names = sorted(set(modes.values()))
    if {"nb", "wb"} <= set(mode_names):
        for mode in mode_names:
            scores[f"pesq_{mode}"] = summarize([r for r in rows if modes.get(r["id"]) == mode], ["pesq"])["pesq"]
        del scores["pesq"]
        warnings.warn("the scored mixtures have sample rates of different PESQ modes (8 kHz: narrow band, other "
                      "rates: wide band): PESQ is summarised per mode ("
                      + ", ".join(f"pesq_{m}" for m in mode_names) + "), not as one mean", stacklevel=3)
    return scores


def _check_same_settings(out_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to resume results of other settings or other weights; a settings.json written before the weights
    were recorded is accepted with a warning (its weights cannot be checked)."""
    legacy = WEIGHTS_KEY in new and WEIGHTS_KEY not in old  # its checkpoint's name is all that identifies it
    if legacy:
        warnings.warn(f"{out_dir / SETTINGS_NAME} does not record which weights scored the results in it (written "
                      f"by an older version): they are kept as results of {new.get('checkpoint')}; pass "
                      "--overwrite if that file may have changed since", stacklevel=3)
        old = {**old, WEIGHTS_KEY: new[WEIGHTS_KEY]}
    ignored = [k for k in RESUME_IGNORED if not (legacy and k == "checkpoint")]
    changed = sorted(k for k in set(old) | set(new) if k not in ignored and old.get(k) != new.get(k))
    if changed:
        weights = ("other weights at the same checkpoint path" if old.get("checkpoint") == new.get("checkpoint")
                   else f"other weights ({old.get('checkpoint')} -> {new.get('checkpoint')})")
        named = [f"{k}: {weights}" if k == WEIGHTS_KEY else _setting_change(k, old, new)
                 for k in changed]
        before = old.get("separator") or {}
        hint = (f" (evaluate separates whole mixtures unless given --chunk-seconds: --chunk-seconds "
                f"{before['chunk_seconds']:g} --overlap-seconds {before.get('overlap_seconds') or 0:g} goes on with "
                "these results)" if before.get("chunk_seconds") is not None
                and (new.get("separator") or {}).get("chunk_seconds") is None else "")
        raise ValueError(f"{out_dir} holds results of a run with other settings ({', '.join(named)}){hint}; "
                         "evaluate into a new --out folder or pass --overwrite to start again")


def _setting_change(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """``separator.chunk_seconds 10.0 -> None``: what changed in one setting (sub-keys of a dict setting)."""
    return ", ".join(f"{name} {before!r} -> {after!r}"
                     for name, before, after in setting_changes({key: old.get(key)}, {key: new.get(key)}))


def _pesq_modes(entries: Sequence[MixtureEntry], rows: Sequence[dict[str, str]], rates: dict[str, int],
                score_rate: int | None) -> dict[str, str]:
    """``{id: PESQ mode}`` of the scored mixtures ("nb" / "wb"); the rates of mixtures scored by an earlier run
    are read from their file headers ("unknown" for a file no longer readable: the summary is still written)."""
    scored = {r["id"] for r in rows if r["status"] == "ok"}
    if score_rate is not None:
        return {e.id: pesq_mode(score_rate) for e in entries if e.id in scored}
    return {e.id: pesq_mode(rates[e.id]) if e.id in rates else _pesq_mode_of_file(e.mix)
            for e in entries if e.id in scored}


def _pesq_mode_of_file(path: Path) -> str:
    from mossformer2.audio import audio_sample_rate

    try:
        return pesq_mode(audio_sample_rate(path))
    except (OSError, ValueError):
        return "unknown"


def _evaluate_one(separator: Any, entry: MixtureEntry, metrics: Sequence[str], score_rate: int | None,
                  header: list[str]) -> tuple[dict[str, str], int, int]:
    """``(CSV row, channels of the mixture file, its sample rate)``; 0 channels and rate when unread."""
    from mossformer2.audio import to_mono
    from mossformer2.utils import warnings_about

    row = dict.fromkeys(header, "")
    row["id"] = entry.id
    channels = rate = 0
    try:
        mix, refs, rate = _read_entry(entry)
        channels, mix = mix.shape[0], to_mono(mix)
        row["duration_s"] = f"{mix.shape[-1] / rate:.3f}"
        with warnings_about(f"mixture {entry.id}"):  # each mixture's guessed chunk boundaries, by name
            estimates = np.asarray(separator.separate(mix, rate))
        if estimates.shape != refs.shape:
            raise ValueError(f"the separator returned shape {estimates.shape}, the references are {refs.shape}")
        scores = score_separation(estimates, refs, mix, rate, metrics=metrics, score_rate=score_rate)
        for column in metric_columns(metrics):
            if column not in scores:  # undefined on this mixture: the reason goes to the error column
                continue
            value = scores[column]
            if not math.isfinite(value):
                raise ValueError(f"{column} is not finite ({value})")
            row[column] = _format_value(value)
        row["permutation"] = " ".join(str(p) for p in scores["permutation"])
        row["status"] = "ok"
        row["error"] = "; ".join(f"{name}: {reason}" for name, reason in scores["errors"].items())
    except ImportError:  # a missing package fails every mixture alike: stop and say which
        raise
    except Exception as err:  # any other failure is recorded for this mixture and the run goes on
        for column in metric_columns(metrics):
            row[column] = ""
        row["status"] = "failed"
        message = str(err).splitlines()[0] if str(err) else ""
        row["error"] = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return row, channels, rate
