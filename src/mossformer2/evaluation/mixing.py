"""Test-mixture creation in the wsj0-2mix layout (``mix/``, ``s1/``, ``s2/``, ... + ``metadata.csv``).

Scaling follows the wsj0-2mix scripts (``create_wav_2speakers.m``): every source is normalised to unit ITU-T
P.56 active speech level, multiplied by ``10 ** (level_db / 20)``, and the sources are summed. For two speakers
the levels are ``+sir/2`` and ``-sir/2`` dB, so the signal-to-interference ratio of s1 over s2 is ``sir``.
**Clipping** is avoided by one common rescale, the scripts' own: mixture and sources are all multiplied by
``0.9 / peak``, ``peak`` being the largest absolute sample of the mixture and of every source, so the loudest
sample sits at 0.9 of full scale while ``mix == s1 + s2 + ...`` and the SIR stay exact.
``mode="min"`` truncates every source to the shortest one; ``"max"`` zero-pads to the longest. The active level
is measured on the whole file for recipes (as the scripts do) and on the part that is mixed otherwise (so that
a random crop still gets the requested SIR).

``metadata.csv`` uses LibriMix column names (``mixture_ID, mixture_path, source_1_path, ...``) with paths
relative to the output folder, so ``mossformer2.data.manifests.load_manifest`` reads it back, plus the
provenance of each source: original file, start sample taken from it, linear gain applied and level in dB.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from mossformer2.audio import (
    find_audio_files,
    has_audio_suffix,
    read_audio,
    resample,
    speaker_folders,
    to_mono,
    write_audio,
)
from mossformer2.data.manifests import UNFINISHED_NAME, load_manifest, strip_comment
from mossformer2.utils import bar_disabled, is_atomic_temp

PEAK_LIMIT = 0.9  # wsj0-2mix multiplies everything by 0.9 / peak (create_wav_2speakers.m: 1 / max_amp * 0.9)
METADATA_NAME = "metadata.csv"
# Beyond this SIR the weaker source is a few steps of 16-bit PCM (at 90 dB and up, silence): no test of separation.
MAX_SIR_DB = 60.0


@dataclass
class MixtureSpec:
    """What to mix: one file per speaker, its level in dB, and where in each file to start (``min`` mode).

    ``start_fractions[k]`` in [0, 1) picks the start of the segment taken from a source longer than the
    mixture: ``floor(fraction * (len_k - mix_len))`` samples.
    """

    id: str
    files: list[Path]
    levels_db: list[float]
    start_fractions: list[float] = field(default_factory=list)
    level_on_whole_file: bool = False  # wsj0-2mix recipes: measure the active level before truncation


def active_level(wave: np.ndarray, sample_rate: int) -> float:
    """Active speech level (linear RMS over active speech) of ``[T]``, after ITU-T P.56 method B.

    Envelope: two cascaded one-pole smoothers (time constant 30 ms) of ``|x|``; a sample is active while the
    envelope has exceeded a threshold within the last 200 ms (hangover). The level is the RMS over active
    samples at the threshold lying 15.9 dB below it (interpolated in dB between thresholds 3 dB apart, relative
    to the envelope peak, so the measure scales exactly with the signal). Stands in for voicebox ``activlev``,
    which the wsj0-2mix scripts call; no maintained Python package provides P.56.
    """
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty mono signal [T], got shape {x.shape}")
    energy = float(np.sum(x**2))
    if energy == 0.0:
        raise ValueError("cannot measure the speech level of a silent signal")
    g = math.exp(-1.0 / (sample_rate * 0.03))
    envelope = lfilter([1 - g], [1, -g], lfilter([1 - g], [1, -g], np.abs(x)))
    hangover = int(round(0.2 * sample_rate))
    margin_db = 15.9
    index = np.arange(x.size)
    # Thresholds from -120 dB to the envelope peak in 3 dB steps, scanned upwards as P.56 does: the level is
    # where (active level - threshold) first falls to the margin.
    thresholds = envelope.max() * 2.0 ** (-np.arange(40, -1, -1) / 2)
    prev: tuple[float, float] | None = None  # (A - C, A) at the previous (lower) threshold
    for c in thresholds:
        last_above = np.maximum.accumulate(np.where(envelope >= c, index, -hangover - 1))
        active = int(np.count_nonzero(index - last_above <= hangover))
        level_db = 10 * math.log10(energy / active)
        diff = level_db - 20 * math.log10(c)
        if diff <= margin_db:
            if prev is None:
                return 10 ** (level_db / 20)
            frac = (prev[0] - margin_db) / (prev[0] - diff)
            return 10 ** ((prev[1] + frac * (level_db - prev[1])) / 20)
        prev = (diff, level_db)
    return math.sqrt(energy / x.size)  # never reached for real signals; plain RMS as the safe fallback


def check_sir(value: float, name: str) -> float:
    """``value`` (dB) unless it is not finite or beyond +-``MAX_SIR_DB``: a ValueError naming ``name``."""
    if not (math.isfinite(value) and abs(value) <= MAX_SIR_DB):
        raise ValueError(f"{name} must be a number of dB from {-MAX_SIR_DB:g} to {MAX_SIR_DB:g} (beyond, the "
                         f"weaker source is a few steps of 16-bit PCM, or silence), got {value:g}")
    return float(value)


def levels_for_sirs(sirs_db: Sequence[float]) -> list[float]:
    """Per-source levels (dB, zero-mean) such that source 1 is ``sirs_db[k-1]`` dB above source k+1.

    Two speakers: ``[sir/2, -sir/2]`` as in wsj0-2mix.
    """
    raw = [0.0] + [-float(s) for s in sirs_db]
    mean = sum(raw) / len(raw)
    return [r - mean for r in raw]


def mix_waves(waves: Sequence[np.ndarray], levels_db: Sequence[float], sample_rate: int, mode: str = "min",
              start_fractions: Sequence[float] | None = None, level_on_whole_file: bool = False
              ) -> tuple[np.ndarray, np.ndarray, list[float], list[int]]:
    """Scale and sum mono sources ``[T_k]``.

    Returns ``(mix [T], sources [S, T], gains, starts)``: the scaled sources as they sit in the mixture, the
    linear gain applied to each input and the first input sample used (``min`` mode crops longer sources).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if len(waves) < 2 or len(levels_db) != len(waves):
        raise ValueError(f"need >= 2 sources with one level each, got {len(waves)} sources and "
                         f"{len(levels_db)} levels")
    fractions = list(start_fractions) if start_fractions else [0.0] * len(waves)
    lengths = [w.shape[-1] for w in waves]
    length = min(lengths) if mode == "min" else max(lengths)
    sources = np.zeros((len(waves), length), dtype=np.float64)
    gains: list[float] = []
    starts: list[int] = []
    for k, (wave, level_db) in enumerate(zip(waves, levels_db)):
        start = int(math.floor(fractions[k] * (lengths[k] - length))) if lengths[k] > length else 0
        wave = np.asarray(wave, dtype=np.float64)
        segment = wave[start:start + length]
        sources[k, : segment.size] = segment
        # Measured as written (zero-padded in "max" mode: P.56's hang-over runs on into the zeros), so that the
        # written files have the SIR asked for.
        gain = 10 ** (level_db / 20) / active_level(wave if level_on_whole_file else sources[k], sample_rate)
        sources[k] *= gain
        gains.append(gain)
        starts.append(start)
    mix = sources.sum(0)
    peak = max(float(np.abs(mix).max()), float(np.abs(sources).max()))
    if not peak > 0:
        raise ValueError("the mixture is silent")
    rescale = PEAK_LIMIT / peak
    mix *= rescale
    sources *= rescale
    return mix, sources, [g * rescale for g in gains], starts


def _level_tag(level_db: float) -> str:
    return f"{level_db + 0.0:.4g}"  # + 0.0 turns -0.0 (the level of s2 at SIR 0) into 0: "0", not "-0"


def plan_from_files(files: Sequence[str | Path], sir_db: float = 0.0) -> list[MixtureSpec]:
    """One mixture of the given files (one per speaker), s1 ``sir_db`` dB above each other source."""
    paths = [Path(f) for f in files]
    if len(paths) < 2:
        raise ValueError(f"need at least two files to mix, got {len(paths)}")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no such audio file: {p}")
    seen: dict[Path, Path] = {}
    for p in paths:  # one recording as two speakers: an inseparable "mixture" whose scores mean nothing
        if p.resolve() in seen:
            raise ValueError(f"{p} is named twice (as {seen[p.resolve()]} before): give each speaker's own recording")
        seen[p.resolve()] = p
    levels = levels_for_sirs([check_sir(sir_db, "sir_db (--sir)")] * (len(paths) - 1))
    mix_id = "_".join(f"{p.stem}_{_level_tag(lv)}" for p, lv in zip(paths, levels))
    return [MixtureSpec(id=mix_id, files=paths, levels_db=levels)]


def speaker_files(root: str | Path) -> dict[str, list[Path]]:
    """``<root>/<speaker>/**/*.wav`` (any audio suffix, hidden names skipped) -> {speaker: sorted files};
    speakers without audio are left out."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"speaker folder not found: {root}")
    table = {}
    for speaker_dir in speaker_folders(root):
        files = find_audio_files(speaker_dir)  # hidden names (macOS ._x.wav sidecars) are not recordings
        if files:
            table[speaker_dir.name] = files
    return table


def plan_from_speaker_folder(root: str | Path, num_mixtures: int, num_spks: int = 2,
                             sir_range: tuple[float, float] = (-5.0, 5.0), seed: int = 0) -> list[MixtureSpec]:
    """Random mixtures of ``num_spks`` different speakers from ``<root>/<speaker>/*.wav``.

    SIRs (s1 over each other source) are uniform in ``sir_range``. Same seed, same plan.
    """
    if num_mixtures < 1:
        raise ValueError(f"num_mixtures must be >= 1, got {num_mixtures}")
    if num_spks < 2:
        raise ValueError(f"num_spks must be >= 2, got {num_spks}")
    low, high = sorted(check_sir(float(v), "sir_range (--sir-range)") for v in sir_range)
    table = speaker_files(root)
    root = Path(root)
    if len(table) < num_spks and any(p.is_file() and not p.name.startswith(".")
                                     and has_audio_suffix(p) for p in root.iterdir()):
        raise ValueError(f"{root} holds audio files itself, so it looks like one speaker's folder; pass the "
                         f"folder that holds one folder per speaker (ROOT/<speaker>/*.wav), e.g. {root.parent}")
    if len(table) < num_spks:
        raise ValueError(f"{root} has {len(table)} speaker folder(s) with audio files; {num_spks} different "
                         "speakers per mixture need at least that many (<root>/<speaker>/*.wav)")
    speakers = list(table)
    rng = np.random.default_rng(seed)
    width = len(str(num_mixtures - 1))
    specs = []
    for i in range(num_mixtures):
        chosen = rng.choice(len(speakers), size=num_spks, replace=False)
        files = [table[speakers[s]][rng.integers(len(table[speakers[s]]))] for s in chosen]
        levels = levels_for_sirs(rng.uniform(low, high, size=num_spks - 1).tolist())
        fractions = rng.uniform(0.0, 1.0, size=num_spks).tolist()
        tag = "_".join(f"{speakers[s]}-{f.stem}_{_level_tag(lv)}" for s, f, lv in zip(chosen, files, levels))
        specs.append(MixtureSpec(id=f"{i:0{width}d}_{tag}", files=files, levels_db=levels,
                                 start_fractions=fractions))
    return specs


def plan_from_recipe(recipe: str | Path, wsj_root: str | Path) -> list[MixtureSpec]:
    """A wsj0-2mix mixing list: lines ``s1_path snr1 s2_path snr2 [s3_path snr3 ...]``, paths relative to
    ``wsj_root``; the dB values are used as given. ``.wv1`` paths fall back to a ``.wav`` beside them, since
    most copies of WSJ0 are converted to wav. Names follow wsj0-2mix: ``<s1 stem>_<snr1>_<s2 stem>_<snr2>``.
    """
    recipe, wsj_root = Path(recipe), Path(wsj_root)
    if not recipe.is_file():
        raise FileNotFoundError(f"recipe file not found: {recipe}")
    if not wsj_root.is_dir():
        raise FileNotFoundError(f"--wsj-root folder not found: {wsj_root}")
    specs = []
    for line_no, raw in enumerate(recipe.read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = strip_comment(raw).split()
        if not fields:
            continue
        if len(fields) < 4 or len(fields) % 2:
            raise ValueError(f"{recipe}, line {line_no}: expected 'path1 snr1 path2 snr2 ...', got {raw!r}")
        paths, levels = [], []
        for path_text, snr_text in zip(fields[::2], fields[1::2]):
            try:
                level = float(snr_text)
            except ValueError:
                raise ValueError(f"{recipe}, line {line_no}: {snr_text!r} is not a dB value") from None
            if not math.isfinite(level):
                raise ValueError(f"{recipe}, line {line_no}: {snr_text!r} is not a finite dB value")
            levels.append(level)
            path = wsj_root / path_text
            if not path.is_file() and path.suffix.lower() == ".wv1" and path.with_suffix(".wav").is_file():
                path = path.with_suffix(".wav")
            if not path.is_file():
                raise FileNotFoundError(f"{recipe}, line {line_no}: source file not found: {path}")
            paths.append(path)
        for level in levels[1:]:  # s1 over each other source, as --sir and --sir-range are checked
            check_sir(levels[0] - level, f"{recipe}, line {line_no}: the SIR of s1 over another source")
        mix_id = "_".join(f"{Path(p).stem}_{s}" for p, s in zip(fields[::2], fields[1::2]))
        specs.append(MixtureSpec(id=mix_id, files=paths, levels_db=levels, level_on_whole_file=True))
    if not specs:
        raise ValueError(f"recipe {recipe} lists no mixtures")
    return specs


def _load_mono(path: Path, sample_rate: int) -> np.ndarray:

    wave, rate = read_audio(path)
    return resample(to_mono(wave), rate, sample_rate)


def _our_audio(out_dir: Path, paths: Sequence[Path]) -> set[Path]:
    """The resolved ``paths`` that are audio files inside ``out_dir`` (files this module may have written)."""
    root = out_dir.resolve()
    resolved = (p.resolve() for p in paths)
    return {p for p in resolved if p.is_relative_to(root) and has_audio_suffix(p)}


def _previous_sets(out_dir: Path) -> set[Path]:
    """The audio files that an earlier ``metadata.csv`` and an unfinished run's list in ``out_dir`` name."""
    listed: list[Path] = []
    metadata_path = out_dir / METADATA_NAME
    if metadata_path.is_file():
        try:
            entries = load_manifest(metadata_path, check_files=False)
        except ValueError:  # not a metadata file this module wrote: leave the files it may name alone
            entries = []
        listed += [path for entry in entries for path in (entry.mix, *entry.sources)]
    unfinished = out_dir / UNFINISHED_NAME
    if unfinished.is_file():
        listed += [out_dir / line for line in unfinished.read_text(encoding="utf-8").splitlines() if line]
    return _our_audio(out_dir, listed)


def _prepare_out_dir(out_dir: Path, new_files: Sequence[Path], overwrite: bool) -> None:
    """Refuse to write beside an earlier set (unless ``overwrite``, which removes it) or beside audio files that
    no set of ours lists; remove temp files that a killed run left."""
    metadata_path, unfinished = out_dir / METADATA_NAME, out_dir / UNFINISHED_NAME
    if metadata_path.exists() and not overwrite:
        raise ValueError(f"{out_dir} already holds mixtures ({METADATA_NAME}); pass --overwrite to replace them")
    if unfinished.exists() and not overwrite:
        raise ValueError(f"{out_dir} holds the files of a `mix` run that did not finish (listed in "
                         f"{UNFINISHED_NAME}); pass --overwrite to remove them and write this set")
    previous = _previous_sets(out_dir) if overwrite else set()
    kept = previous | _our_audio(out_dir, new_files)
    folders = [f for f in (out_dir / "mix", *sorted(out_dir.glob("s[0-9]*"))) if f.is_dir()]
    # The folder loader reads every audio file in mix/: one no set of ours lists would be scored with this set.
    foreign = [p for f in folders for p in find_audio_files(f) if p.resolve() not in kept]
    if foreign:
        shown = ", ".join(str(p.relative_to(out_dir)) for p in foreign[:3])
        raise ValueError(f"{out_dir} already holds {len(foreign)} audio file(s) that no {METADATA_NAME} lists and "
                         f"this set does not write ({shown}{', ...' if len(foreign) > 3 else ''}): "
                         f"`evaluate --data {out_dir}` would score them with this set; move them away or choose "
                         "another --out-dir")
    for path in previous:
        path.unlink(missing_ok=True)
    metadata_path.unlink(missing_ok=True)
    unfinished.unlink(missing_ok=True)
    for folder in (out_dir, *folders):  # the metadata's and the audio files' temp files
        for path in folder.iterdir():
            if is_atomic_temp(path) and path.is_file():
                path.unlink(missing_ok=True)


def create_mixtures(specs: Sequence[MixtureSpec], out_dir: str | Path, sample_rate: int = 16000,
                    mode: str = "min", subtype: str = "PCM_16", overwrite: bool = False,
                    progress: bool | None = True) -> Path:
    """Render ``specs`` into ``out_dir`` (wsj0-2mix layout) and write ``metadata.csv``; returns its path.

    Every file is written atomically; ``metadata.csv`` comes last, so its presence marks a complete set. A run
    that fails part-way removes the files it wrote; a killed one leaves them listed in ``.mix_unfinished.txt``.
    ``overwrite`` first removes the set that an existing ``metadata.csv`` or ``.mix_unfinished.txt`` lists (so no
    stale mixture is left in ``mix/`` for the folder loader to pick up); audio files that neither lists and this
    set does not write make the run refuse.
    """
    from tqdm import tqdm

    from mossformer2.utils import atomic_write_text, make_folder

    out_dir = Path(out_dir)
    num_spks = _check_specs(specs)
    folders = ["mix", *(f"s{k + 1}" for k in range(num_spks))]

    def names_of(spec: MixtureSpec) -> list[str]:  # [mix, s1, s2, ...]: listed, written and in the CSV alike
        return [f"{folder}/{spec.id}.wav" for folder in folders]

    planned = [name for spec in specs for name in names_of(spec)]
    # Made here, after the checks above; a run that fails removes the folders it made (empty ones only).
    absolute = out_dir.absolute()
    made = [d for d in (*reversed(absolute.parents), absolute, *(absolute / f for f in folders)) if not d.exists()]
    make_folder(out_dir, "output folder")
    _prepare_out_dir(out_dir, [out_dir / name for name in planned], overwrite)
    atomic_write_text(out_dir / UNFINISHED_NAME, "".join(f"{name}\n" for name in planned))
    rows = []
    written: list[Path] = []
    try:
        for spec in tqdm(specs, desc="mixing", unit="mix", disable=bar_disabled(progress)):
            rows.append(_render(spec, out_dir, names_of(spec), sample_rate, mode, subtype, written))
    except BaseException:  # a bad input file, Ctrl-C: leave no incomplete set that the folder loader would read
        for path in written:
            path.unlink(missing_ok=True)
        (out_dir / UNFINISHED_NAME).unlink(missing_ok=True)
        for folder in reversed(made):  # the set's folders, then the output folder
            with contextlib.suppress(OSError):  # not empty: something else is there
                folder.rmdir()
        raise
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_metadata_header(num_spks))
    writer.writerows(rows)
    metadata_path = out_dir / METADATA_NAME
    atomic_write_text(metadata_path, buffer.getvalue())
    (out_dir / UNFINISHED_NAME).unlink()
    return metadata_path


def _check_specs(specs: Sequence[MixtureSpec]) -> int:
    """The speaker count of ``specs``; ValueError for none, names used twice or unequal speaker counts."""
    if not specs:
        raise ValueError("nothing to mix")
    first_of: dict[str, int] = {}
    for number, spec in enumerate(specs, 1):
        if spec.id in first_of:
            raise ValueError(f"mixtures {first_of[spec.id]} and {number} (in the order given) would get the same name "
                             f"{spec.id!r}: their files have the same names and levels; rename a file or change a "
                             "level")
        first_of[spec.id] = number
    num_spks = len(specs[0].files)
    if any(len(s.files) != num_spks for s in specs):
        raise ValueError("all mixtures must have the same number of speakers")
    return num_spks


def _metadata_header(num_spks: int) -> list[str]:
    return (["mixture_ID", "mixture_path"] + [f"source_{k + 1}_path" for k in range(num_spks)] + ["length"]
            + [f"source_{k + 1}_{what}" for k in range(num_spks) for what in ("file", "offset", "gain", "level_db")]
            + ["sir_db"] + [f"sir_db_s{k + 1}" for k in range(2, num_spks)])


def _render(spec: MixtureSpec, out_dir: Path, names: list[str], sample_rate: int, mode: str, subtype: str,
            written: list[Path]) -> list[object]:
    """Mix ``spec``, write its files ``names`` ([mix, s1, ...], appended to ``written`` as they land) and return
    its metadata row."""
    num_spks = len(spec.files)
    waves = [_load_mono(f, sample_rate) for f in spec.files]
    try:
        mix, sources, gains, starts = mix_waves(waves, spec.levels_db, sample_rate, mode, spec.start_fractions,
                                                spec.level_on_whole_file)
    except ValueError as err:
        raise ValueError(f"mixture {spec.id} ({', '.join(map(str, spec.files))}): {err}") from err
    for name, wave in zip(names, (mix, *sources[:num_spks])):
        written.append(write_audio(out_dir / name, wave.astype(np.float32), sample_rate, subtype=subtype))
    row = [spec.id, *names, mix.size]
    for k in range(num_spks):
        # The original file as an absolute path: relative to where `mix` ran it would say nothing.
        row += [str(Path(spec.files[k]).resolve()), starts[k], f"{gains[k]:.8g}", f"{spec.levels_db[k] + 0.0:.6g}"]
    # s1 over s2 (sir_db), and over each further source (sir_db_s3, ...)
    return row + [f"{spec.levels_db[0] - level:.6g}" for level in spec.levels_db[1:num_spks]]
