"""Build an offline single-speaker speech corpus from Debian packages (+ optional synthetic voices).

Output layout (see README.md next to this file)::

    <out>/<split>/<speaker>/<utterance>.wav   16 kHz mono PCM_16, split in {train, valid, test}
    <out>/manifest.csv                        one row per wav: path, split, speaker, package, licence, ...
    <out>/LICENSES.md                         licence of every package used (+ licenses/<pkg>.copyright)
    <out>/stats.json                          speakers and hours per split

Real speech comes from packages fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (no root
install). Whole speakers are held out for validation and test. The ``asterisk-core-sounds-*`` packages are
reserved for independent evaluation and are refused everywhere in this recipe.

Usage::

    python recipes/offline_speech/prepare.py --out /work/corpus [--no-synthetic] [--packages P ...]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr

from mossformer2.utils import atomic_path, atomic_write_text

SAMPLE_RATE = 16000
SPLITS = ("train", "valid", "test")
AUDIO_SUFFIXES = (".ogg", ".opus", ".wav", ".gsm", ".flac", ".mp3")
# Reserved for independent evaluation: never download, unpack or read these.
RESERVED_PACKAGE_PREFIX = "asterisk-core-sounds"
# Debian policy 5.6.7. Explicit ASCII ranges: no look-alike letter, digit or dash matches.
_DEBIAN_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")

# ---------------------------------------------------------------------------------------------------------
# Guard


def check_package_allowed(name: str) -> str:
    """Return the bare package name, or raise ValueError for a reserved package or anything but a plain name.

    Accepts ``name``, ``name=version``, ``name:arch``, ``name/release`` and ``.deb`` file names
    (``[dir/]name_version_arch.deb``). What is left must follow Debian's package-name grammar: apt also expands
    globs (``*?[]``) and patterns (``?name(...)``, ``~n``), which could resolve to a reserved package while
    never spelling its name, so those are refused rather than passed on.
    """
    text = str(name).lower()
    # Any mention of the reserved prefix, whatever surrounds it, is refused with the clearest message.
    if RESERVED_PACKAGE_PREFIX in text:
        raise ValueError(
            f"package {name!r} is refused: the {RESERVED_PACKAGE_PREFIX}-* packages are reserved for "
            "independent evaluation and must never be used to build training data"
        )
    if text.endswith(".deb"):  # a file: only then is '/' a folder ('name/release' elsewhere)
        bare = Path(text).name.split("_", 1)[0].removesuffix(".deb")
    else:
        bare = text.split("/", 1)[0]
    bare = re.split(r"[=:]", bare, maxsplit=1)[0]
    if not _DEBIAN_PACKAGE_NAME.fullmatch(bare):
        raise ValueError(
            f"package {name!r} is refused: {bare!r} is not a plain Debian package name ([a-z0-9][a-z0-9+.-]+); "
            "apt globs, patterns, whitespace and look-alike characters are not accepted"
        )
    return bare


def check_path_allowed(path: str | Path) -> Path:
    """Refuse any file that comes from a reserved package (e.g. a stray unpack in the cache)."""
    if RESERVED_PACKAGE_PREFIX in str(path).lower():
        raise ValueError(f"file {path} belongs to a reserved {RESERVED_PACKAGE_PREFIX}-* package; refused")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Package catalogue: which files of each package are speech, and who speaks them


@dataclass(frozen=True)
class Clip:
    """One recorded utterance inside an unpacked package."""

    source: Path  # file inside the unpacked package
    speaker: str  # corpus speaker label
    family: str  # source family, used to spread held-out speakers over families
    tie: str  # speakers with the same tie always land in the same split (maybe the same person)


def _sanitize(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def _select_tuxpaint(root: Path) -> list[Clip]:
    # Only the spoken stamp descriptions (``*_desc[_LANG].ogg``); the other sounds are effects.
    # One speaker per language (``_desc.ogg`` without a language is English).
    pattern = re.compile(r"_desc(?:_([A-Za-z]{2,3}(?:_[A-Za-z]{2})?))?\.ogg$")
    clips = []
    for path in _audio_files(root / "usr/share/tuxpaint/stamps"):
        match = pattern.search(path.name)
        if match:
            lang = match.group(1) or "en"
            clips.append(Clip(path, f"tuxpaint-{lang}", "tuxpaint", f"tuxpaint-{lang}"))
    return clips


def _kde_lang(folder: str) -> str:
    # sr, sr@latin, sr@ijekavian... are the same recordings in other scripts: one speaker.
    return _sanitize(folder.split("@", 1)[0])


def _select_ktuberling(root: Path) -> list[Clip]:
    base = root / "usr/share/ktuberling/sounds"
    clips = []
    for path in _audio_files(base):
        rel = path.relative_to(base)
        if len(rel.parts) != 2:
            continue
        lang = _kde_lang(rel.parts[0])
        # KDE translators may have recorded both ktuberling and klettres: tie them by language.
        clips.append(Clip(path, f"ktuberling-{lang}", "kde", f"kde-{lang.split('_')[0]}"))
    return clips


def _select_klettres(root: Path) -> list[Clip]:
    base = root / "usr/share/klettres"
    clips = []
    for path in _audio_files(base):
        rel = path.relative_to(base)
        if len(rel.parts) != 3 or rel.parts[1] not in ("alpha", "syllab"):
            continue
        lang = _kde_lang(rel.parts[0])
        clips.append(Clip(path, f"klettres-{lang}", "kde", f"kde-{lang.split('_')[0]}"))
    return clips


def _select_fillets(lang: str) -> Callable[[Path], list[Clip]]:
    # Files are <level>-<character>-<line>.ogg; the two fish ("m" small, "v" big) are voiced by one actor
    # each per language throughout the game. Other characters are few lines, often effects: skipped.
    characters = {"m": "smallfish", "v": "bigfish"}

    def select(root: Path) -> list[Clip]:
        clips = []
        for path in _audio_files(root / "usr/share/games/fillets-ng/sound"):
            if path.parent.name != lang:
                continue
            parts = path.stem.split("-")
            if len(parts) >= 3 and parts[1] in characters:
                speaker = f"fillets-{lang}-{characters[parts[1]]}"
                clips.append(Clip(path, speaker, "fillets", speaker))
        return clips

    return select


def _select_hedgewars(root: Path) -> list[Clip]:
    # One voice pack per folder (``Default``, ``Pirate``, ``Default_ru``...), each recorded by one voice actor:
    # short acted exclamations ("Incoming!", "Oops"). Pack names are labels, not verified identities.
    base = root / "usr/share/games/hedgewars/Data/Sounds/voices"
    clips = []
    for path in _audio_files(base):
        rel = path.relative_to(base)
        if len(rel.parts) == 2:
            speaker = f"hedgewars-{_sanitize(rel.parts[0])}"
            clips.append(Clip(path, speaker, "hedgewars", speaker))
    return clips


def _select_festvox_ru(root: Path) -> list[Clip]:
    # The recorded sentences of Festival's Russian unit-selection voice (one male speaker, ~100 min): real
    # speech, unlike the diphone voices of the other festvox packages.
    speaker = "festvox-ru-nsh"
    base = root / "usr/share/festival/voices/russian/msu_ru_nsh_clunits/wav"
    return [Clip(path, speaker, "festvox", speaker) for path in _audio_files(base)]


def _select_gcin(root: Path) -> list[Clip]:
    # Mandarin syllables ``<zhuyin>/<n>.ogg``: per debian/copyright, 3.ogg was recorded by gcin's author and 5.ogg
    # by a voice actor (Chu Lo): two speakers.
    voices = {"3": "gcin-3", "5": "gcin-5"}
    clips = []
    for path in _audio_files(root / "usr/share/gcin-voice/ogg"):
        if path.stem in voices:
            clips.append(Clip(path, voices[path.stem], "gcin", voices[path.stem]))
    return clips


_0AD_VOICE = re.compile(r"audio/voice/([a-z]+)/civ/civ_(male|female)_[A-Za-z0-9_]+\.ogg")


def _select_0ad(root: Path) -> list[Clip]:
    # 0 A.D.'s unit voices (short orders in ancient languages) are inside the game's public.zip: extracted once
    # beside the unpacked package. One speaker per language and sex, a label rather than a verified identity.
    extracted = root / "extracted-voices"
    if not (extracted / ".complete").is_file():
        with zipfile.ZipFile(root / "usr/share/games/0ad/mods/public/public.zip") as archive:
            for name in archive.namelist():
                if _0AD_VOICE.fullmatch(name):  # fixed pattern: no absolute or '..' member can match
                    archive.extract(name, extracted)
        (extracted / ".complete").write_text("")
    clips = []
    for path in _audio_files(extracted / "audio/voice"):
        match = _0AD_VOICE.fullmatch(path.relative_to(extracted).as_posix())
        if match:
            speaker = f"0ad-{match.group(1)}-{match.group(2)}"
            clips.append(Clip(path, speaker, "0ad", speaker))
    return clips


def _select_single_speaker(speaker: str) -> Callable[[Path], list[Clip]]:
    def select(root: Path) -> list[Clip]:
        return [Clip(p, speaker, "asterisk-prompt", speaker) for p in _audio_files(root / "usr/share/asterisk")]

    return select


@dataclass(frozen=True)
class PackageSpec:
    select: Callable[[Path], list[Clip]]
    licence: str  # summary read from the package's /usr/share/doc/<pkg>/copyright
    note: str = ""
    # Train-only sources never enter the valid/test draw, so adding one leaves the held-out speakers, their
    # files and the order of every other speaker's clips unchanged (comparable scores across corpus versions).
    train_only: bool = False


PACKAGES: dict[str, PackageSpec] = {
    "tuxpaint-stamps-default": PackageSpec(
        _select_tuxpaint, "GPL-2 (or later per the licence text)", "spoken stamp descriptions, one voice per language"
    ),
    "ktuberling-data": PackageSpec(_select_ktuberling, "GPL-2+", "spoken object names, one voice per language"),
    "klettres-data": PackageSpec(_select_klettres, "GPL-2+", "spoken letters and syllables, one voice per language"),
    "fillets-ng-data-cs": PackageSpec(_select_fillets("cs"), "GPL-2", "Czech game dialogue, two fish voices"),
    "fillets-ng-data-nl": PackageSpec(_select_fillets("nl"), "GPL-2", "Dutch game dialogue, two fish voices"),
    "asterisk-prompt-fr-armelle": PackageSpec(
        _select_single_speaker("asterisk-fr-armelle"),
        "BSD-style (redistribution with copyright notice retained)",
        "French telephone prompts, 8 kHz GSM",
    ),
    "asterisk-prompt-es-co": PackageSpec(
        _select_single_speaker("asterisk-es-co"), "GPL-2", "Colombian Spanish telephone prompts, 8 kHz GSM"
    ),
    "asterisk-prompt-it-menardi-wav": PackageSpec(
        _select_single_speaker("asterisk-it-menardi"), "CC-BY-SA-3.0 (Italy)", "Italian telephone prompts, 8 kHz"
    ),
    "hedgewars-data": PackageSpec(
        _select_hedgewars,
        "GFDL-1.3 (Data/Sounds)",
        "game voice packs, short acted exclamations, one actor per pack; train split only",
        train_only=True,
    ),
    "festvox-ru": PackageSpec(
        _select_festvox_ru,
        "BSD-like (voice data, N. V. Shmyrev)",
        "recorded Russian sentences of a unit-selection voice, one speaker; train split only",
        train_only=True,
    ),
    "gcin-voice": PackageSpec(
        _select_gcin,
        "GPL-3 or LGPL-3 (3.ogg), CC-BY-3 (5.ogg)",
        "Mandarin syllables, two speakers; train split only",
        train_only=True,
    ),
    "0ad-data": PackageSpec(
        _select_0ad,
        "CC-BY-SA-3.0",
        "game unit voices (short orders), one voice per language and sex; train split only (1.4 GB download)",
        train_only=True,
    ),
}
for _name in PACKAGES:
    check_package_allowed(_name)


# ---------------------------------------------------------------------------------------------------------
# Audio: decode, resample, trim, normalise, pack


def decode_audio(path: str | Path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file to mono float32 ``[T]`` at ``target_sr``.

    libsndfile (soundfile) first: it reads every Ogg Vorbis file of the packages, including some FFmpeg
    refuses; PyAV (FFmpeg) for what libsndfile cannot read, such as headerless GSM telephone prompts.
    """
    path = check_path_allowed(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=True)  # [T, C]
        wave = wave.mean(axis=1)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        wave, rate = _decode_with_pyav(path)
    if len(wave) == 0:
        raise ValueError(f"audio file {path} holds no samples")
    return resample(wave, rate, target_sr)


def _decode_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    fmt = "gsm" if path.suffix.lower() == ".gsm" else None  # raw GSM has no header to probe
    chunks, rate = [], 0
    try:
        with av.open(str(path), format=fmt, metadata_errors="replace") as container:
            for frame in container.decode(container.streams.audio[0]):
                raw = frame.to_ndarray()
                data = raw.astype(np.float32)
                if frame.format.is_planar:
                    data = data.mean(axis=0)  # [C, n] -> [n]
                else:
                    data = data.reshape(-1, len(frame.layout.channels)).mean(axis=1)  # interleaved
                if np.issubdtype(raw.dtype, np.integer):
                    data = data / float(np.iinfo(raw.dtype).max + 1)
                chunks.append(data)
                rate = frame.sample_rate
    except (av.error.FFmpegError, IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot decode audio file {path}: {err}") from err
    if not chunks:
        raise ValueError(f"audio file {path} holds no samples")
    return np.concatenate(chunks), rate


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``[T]`` float -> ``[T']`` float32 with soxr (high quality)."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave
    return soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32)


def trim_silence(
    wave: np.ndarray,
    sample_rate: int,
    threshold_db: float = -40.0,
    pad_seconds: float = 0.1,
    frame_seconds: float = 0.02,
) -> np.ndarray:
    """Cut leading/trailing frames quieter than ``threshold_db`` below the loudest frame; keep ``pad_seconds``.

    ``wave`` is ``[T]``; returns a view ``[T']`` (empty if the file is all silence).
    """
    if wave.ndim != 1:
        raise ValueError(f"trim_silence expects a mono [T] array, got shape {wave.shape}")
    frame = max(1, int(round(frame_seconds * sample_rate)))
    n_frames = int(np.ceil(len(wave) / frame))
    if n_frames == 0:
        return wave
    padded = np.zeros(n_frames * frame, dtype=np.float64)
    padded[: len(wave)] = wave
    energy = (padded.reshape(n_frames, frame) ** 2).mean(axis=1)
    peak = energy.max()
    if peak <= 1e-12:  # digital silence
        return wave[:0]
    loud = np.flatnonzero(10.0 * np.log10(energy / peak + 1e-20) > threshold_db)
    pad = int(round(pad_seconds * sample_rate))
    start = max(0, loud[0] * frame - pad)
    end = min(len(wave), (loud[-1] + 1) * frame + pad)
    return wave[start:end]


def normalize_level(wave: np.ndarray, rms_dbfs: float = -25.0, peak_limit: float = 0.95) -> np.ndarray:
    """Scale ``[T]`` to ``rms_dbfs`` (sources differ by > 20 dB), then down if the peak would clip."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    if rms <= 1e-9:
        raise ValueError("cannot normalise a silent signal")
    gain = 10.0 ** (rms_dbfs / 20.0) / rms
    peak = float(np.abs(wave).max()) * gain
    if peak > peak_limit:
        gain *= peak_limit / peak
    return (wave * gain).astype(np.float32)


def pack_clips(lengths: Sequence[int], target_length: int) -> list[list[int]]:
    """Group consecutive clip indices so each group reaches ``target_length`` samples (the last may not).

    Short clips (single letters, words) are joined per speaker into utterances long enough for 4 s mixing.
    ``target_length <= 0`` keeps every clip alone.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, length in enumerate(lengths):
        current.append(index)
        total += int(length)
        if target_length <= 0 or total >= target_length:
            groups.append(current)
            current, total = [], 0
    if current:
        groups.append(current)
    return groups


def join_clips(clips: Sequence[np.ndarray], gap: int) -> np.ndarray:
    """Concatenate ``[T_i]`` clips with ``gap`` zero samples between them -> ``[sum T_i + gaps]``."""
    pieces: list[np.ndarray] = []
    for i, clip in enumerate(clips):
        if i:
            pieces.append(np.zeros(gap, dtype=np.float32))
        pieces.append(np.asarray(clip, dtype=np.float32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# Speaker split


@dataclass(frozen=True)
class SpeakerInfo:
    name: str
    family: str
    tie: str


def split_speakers(
    speakers: Iterable[SpeakerInfo], valid_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """Assign whole speakers to train/valid/test; speakers sharing a ``tie`` always share a split.

    Held-out speakers are drawn from every family in proportion to its size.
    Returns ``{speaker: split}``; deterministic for a given seed.
    """
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions valid={valid_fraction} test={test_fraction}: need 0 <= f and sum < 1")
    ties: dict[str, list[str]] = defaultdict(list)
    tie_family: dict[str, str] = {}
    for info in speakers:
        ties[info.tie].append(info.name)
        tie_family.setdefault(info.tie, info.family)
    if not ties:
        raise ValueError("no speakers to split")
    rng = random.Random(seed)
    by_family: dict[str, list[str]] = defaultdict(list)
    for tie in sorted(ties):
        by_family[tie_family[tie]].append(tie)
    # Systematic stratified sampling: in a family of n units the i-th (shuffled) unit gets the key
    # (i + offset) / n, so the lowest keys overall take every family in proportion to its size and small
    # families keep training speakers.
    keyed: list[tuple[float, str]] = []
    for family in sorted(by_family):
        units = by_family[family]
        rng.shuffle(units)
        offset = rng.random()
        keyed += [((i + offset) / len(units), tie) for i, tie in enumerate(units)]
    order = [tie for _, tie in sorted(keyed)]
    n_units = len(order)
    n_test = max(1, round(n_units * test_fraction)) if test_fraction > 0 else 0
    n_valid = max(1, round(n_units * valid_fraction)) if valid_fraction > 0 else 0
    if n_test + n_valid >= n_units:
        raise ValueError(f"only {n_units} independent speaker groups: too few to hold out valid and test speakers")
    assignment: dict[str, str] = {}
    for position, tie in enumerate(order):
        split = "test" if position < n_test else "valid" if position < n_test + n_valid else "train"
        for name in ties[tie]:
            assignment[name] = split
    return assignment


# ---------------------------------------------------------------------------------------------------------
# Synthetic voices


SENTENCES = (
    # Written for this recipe; released into the public domain.
    "The morning train was late again, so we walked along the river to the old bridge.",
    "Please put the blue cup on the second shelf, next to the jar of honey.",
    "A small dog chased the leaves across the garden until it fell asleep in the sun.",
    "Seven people signed up for the evening class, but only four of them arrived on time.",
    "When the wind changes direction, the boats turn slowly and the sails begin to flap.",
    "She counted the coins twice and found that one of them came from another country.",
    "The library closes at six on weekdays and at noon on Saturdays.",
    "We should check the map before the road splits into three narrow lanes.",
    "Warm bread and fresh soup were waiting on the table when the children came home.",
    "He repaired the bicycle with a borrowed wrench and a piece of wire.",
    "Thunder rolled over the hills while the farmers hurried to close the barn doors.",
    "Our neighbour grows tomatoes, beans and tall yellow flowers along the fence.",
    "The meeting will start at half past nine in the room at the end of the corridor.",
    "Nobody remembered who had left the window open during the storm last night.",
    "Every winter the lake freezes, and people skate from one village to the next.",
    "Turn left after the bakery, then walk straight on until you see the green door.",
    "The old clock in the hall stopped at exactly a quarter to three.",
    "My sister wrote a letter to her friend who lives near the mountains.",
    "The engineer explained how the bridge carries its weight down to the rocks below.",
    "If you listen carefully, you can hear the owls calling from the forest at dusk.",
    "They painted the kitchen white and hung a large mirror above the fireplace.",
    "The museum keeps a collection of maps that are more than three hundred years old.",
    "A cold glass of water is the best thing after a long walk in the heat.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "Nine red apples and a bag of flour cost less than we expected.",
    "The pilot announced that we would land twenty minutes ahead of schedule.",
    "Could you tell me the way to the station, or is it too far to walk?",
    "Snow covered the roofs, and the streets were quiet except for a single car.",
    "The teacher asked the class to describe their favourite place in five sentences.",
    "After the rain the air smelled of wet earth and cut grass.",
    "The fisherman mended his nets on the harbour wall while the gulls watched.",
    "We planted an oak tree in the park to mark the first day of spring.",
    "The radio played an old song that my grandfather used to whistle.",
    "Two cats sat on the wall, pretending not to notice each other.",
    "The shop on the corner sells newspapers, stamps and very strong coffee.",
    "Light travels faster than sound, which is why we see lightning before we hear it.",
    "Keep the receipt in case the shoes do not fit.",
    "The baker wakes up at four to prepare the dough for the morning rolls.",
    "At the top of the tower there is a narrow balcony with a view of the whole city.",
    "The students built a tiny boat and tested it in the school pond.",
    "He forgot his umbrella on the bus and got soaked on the way to work.",
    "The recipe needs two eggs, a cup of milk and a pinch of salt.",
    "Far away, a ship's horn sounded through the fog.",
    "The children laughed when the clown's hat flew off in the wind.",
    "It takes about an hour to climb the hill and ten minutes to run back down.",
    "The farmer sold potatoes, onions and carrots at the Sunday market.",
    "Please speak a little more slowly so that everyone can follow.",
    "The lamp flickered twice and then the whole house went dark.",
)


@dataclass(frozen=True)
class VoiceSetting:
    """One synthetic speaker: engine, voice, pitch and rate (engine-specific units)."""

    engine: str  # "espeak-ng" or "flite"
    voice: str
    pitch: float  # espeak-ng: 0..99; flite: target F0 mean in Hz
    rate: float  # espeak-ng: words per minute; flite: duration stretch (1 = normal)

    @property
    def speaker(self) -> str:
        return _sanitize(f"synth-{self.engine}-{self.voice}-p{self.pitch:g}-r{self.rate:g}")

    def command(self, text: str, wav_path: Path) -> list[str]:
        if self.engine == "espeak-ng":
            return [
                "espeak-ng",
                "-v",
                self.voice,
                "-p",
                str(int(self.pitch)),
                "-s",
                str(int(self.rate)),
                "-w",
                str(wav_path),
                text,
            ]
        if self.engine == "flite":
            return [
                "flite",
                "-voice",
                self.voice,
                "--setf",
                f"int_f0_target_mean={self.pitch:g}",
                "--setf",
                f"duration_stretch={self.rate:g}",
                "-t",
                text,
                "-o",
                str(wav_path),
            ]
        raise ValueError(f"unknown synthesis engine {self.engine!r}: use 'espeak-ng' or 'flite'")


ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt3")
FLITE_VOICES = {"slt": (150, 230), "rms": (85, 140), "awb": (90, 145), "kal16": (85, 130)}


def synthetic_voices(count: int, seed: int = 0, engines: Sequence[str] = ("espeak-ng", "flite")) -> list[VoiceSetting]:
    """``count`` distinct voice settings spread over the available engines (deterministic per seed)."""
    rng = random.Random(seed)
    settings: dict[str, VoiceSetting] = {}
    attempts = 0
    while len(settings) < count:
        attempts += 1
        if attempts > 100 * count + 100:
            raise ValueError(f"cannot draw {count} distinct synthetic voices")
        engine = engines[len(settings) % len(engines)]
        if engine == "espeak-ng":
            voice = f"{rng.choice(ESPEAK_VOICES)}+{rng.choice(ESPEAK_VARIANTS)}"
            setting = VoiceSetting(engine, voice, rng.randrange(20, 81, 10), rng.randrange(130, 191, 15))
        elif engine == "flite":
            voice = rng.choice(sorted(FLITE_VOICES))
            low, high = FLITE_VOICES[voice]
            setting = VoiceSetting(engine, voice, rng.randrange(low, high + 1, 15), rng.choice((0.85, 1.0, 1.15)))
        else:
            raise ValueError(f"unknown synthesis engine {engine!r}: use 'espeak-ng' or 'flite'")
        settings.setdefault(setting.speaker, setting)
    return list(settings.values())


def synthesize(setting: VoiceSetting, text: str) -> np.ndarray:
    """Run the engine and return ``[T]`` float32 at 16 kHz."""
    if shutil.which(setting.engine) is None:
        raise FileNotFoundError(
            f"{setting.engine} is not installed: `apt-get install {setting.engine}`, or pass --no-synthetic"
        )
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "tts.wav"
        result = subprocess.run(setting.command(text, wav_path), capture_output=True, text=True)
        if result.returncode != 0 or not wav_path.is_file():
            raise ValueError(f"{setting.engine} failed for voice {setting.voice}: {result.stderr.strip()[:300]}")
        wave, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    return resample(wave.mean(axis=1), rate, SAMPLE_RATE)


# ---------------------------------------------------------------------------------------------------------
# Debian packages


def _cached_debs(debs: Path, name: str) -> list[Path]:
    # By exact package name: 'name_*.deb' would also be a pattern if name were not already validated.
    return sorted(p for p in debs.glob("*.deb") if p.name.split("_", 1)[0] == name)


def _deb_control(deb: Path) -> dict[str, str]:
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split(": ", 1) for line in fields.strip().splitlines())


def fetch_package(name: str, cache: Path) -> tuple[Path, str]:
    """``apt-get download`` + ``dpkg-deb -x`` into ``cache``; returns (unpacked root, version). Cached."""
    name = check_package_allowed(name)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = _cached_debs(debs, name)
    if not found:
        # '--': the validated name can never be read as an option.
        result = subprocess.run(["apt-get", "download", "--", name], cwd=debs, capture_output=True, text=True)
        found = _cached_debs(debs, name)
        if result.returncode != 0 or not found:
            raise ValueError(f"apt-get download {name} failed (run `apt-get update`?): {result.stderr.strip()[:300]}")
    controls = [_deb_control(deb) for deb in found]  # every file, not only the one unpacked: file names can lie
    for deb, control in zip(found, controls):
        check_package_allowed(control["Package"])
        if control["Package"] != name:  # otherwise LICENSES.md would credit the wrong package and version
            raise ValueError(f"{deb} holds package {control['Package']!r}, not {name!r}: remove it from the cache")
    root = cache / "unpacked" / name
    if not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], check=True)
        (root / ".complete").write_text(controls[-1]["Version"])
    # The version of what was unpacked (a newer .deb may have joined the cache since).
    return root, (root / ".complete").read_text()


def licence_lines(copyright_text: str) -> list[str]:
    """Distinct ``License:`` short names of a DEP-5 copyright file (empty for free-form files)."""
    names = re.findall(r"^License:[ \t]*(\S.*)$", copyright_text, flags=re.MULTILINE)
    return sorted(set(n.strip() for n in names))


# ---------------------------------------------------------------------------------------------------------
# Corpus assembly


@dataclass
class Row:
    path: str
    split: str
    speaker: str
    source_package: str
    licence: str
    duration_s: float
    sources: list[str] = field(default_factory=list)


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def collect_clips(package_roots: dict[str, Path]) -> list[tuple[str, Clip]]:
    """All speech clips of the packages, byte-identical duplicates dropped (they would leak across splits)."""
    seen: set[str] = set()
    clips: list[tuple[str, Clip]] = []
    for package, root in package_roots.items():
        for clip in PACKAGES[package].select(root):
            digest = _file_digest(clip.source)
            if digest not in seen:
                seen.add(digest)
                clips.append((package, clip))
    return clips


def write_speaker(
    out: Path,
    split: str,
    speaker: str,
    package: str,
    licence: str,
    waves: Iterable[tuple[np.ndarray, str]],
    max_seconds: float,
    pack_seconds: float,
    gap_seconds: float,
) -> list[Row]:
    """Trim/normalise/pack one speaker's clips into ``out/split/speaker/*.wav``; stop after ``max_seconds``."""
    kept: list[tuple[np.ndarray, str]] = []
    total = 0
    for wave, origin in waves:
        if total >= max_seconds * SAMPLE_RATE:
            break
        kept.append((wave, origin))
        total += len(wave)
    groups = pack_clips([len(w) for w, _ in kept], int(pack_seconds * SAMPLE_RATE))
    rows = []
    for number, group in enumerate(groups):
        audio = normalize_level(join_clips([kept[i][0] for i in group], int(gap_seconds * SAMPLE_RATE)))
        rel = Path(split) / speaker / f"{speaker}_{number:04d}.wav"
        with atomic_path(out / rel) as tmp:
            sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        rows.append(
            Row(
                rel.as_posix(),
                split,
                speaker,
                package,
                licence,
                round(len(audio) / SAMPLE_RATE, 3),
                [kept[i][1] for i in group],
            )
        )
    return rows


def _real_waves(
    clips: list[Clip], roots: Path, rng: random.Random, min_seconds: float, trim_db: float
) -> Iterable[tuple[np.ndarray, str]]:
    order = list(clips)
    rng.shuffle(order)
    for clip in order:
        try:
            wave = decode_audio(clip.source)
        except ValueError as err:
            print(f"skipped {clip.source}: {err}", file=sys.stderr)
            continue
        wave = trim_silence(wave, SAMPLE_RATE, threshold_db=trim_db)
        if len(wave) >= min_seconds * SAMPLE_RATE:
            yield wave, clip.source.relative_to(roots).as_posix()


def _synthetic_waves(
    setting: VoiceSetting,
    count: int,
    rng: random.Random,
    trim_db: float,
) -> Iterable[tuple[np.ndarray, str]]:
    for _ in range(count):
        text = " ".join(rng.sample(SENTENCES, 2))
        wave = trim_silence(synthesize(setting, text), SAMPLE_RATE, threshold_db=trim_db)
        if len(wave):
            yield wave, f"{setting.engine}:{setting.voice}:pitch={setting.pitch:g}:rate={setting.rate:g}:{text}"


def write_manifest(path: Path, rows: Sequence[Row]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "split", "speaker", "source_package", "licence", "duration_s", "sources"])
    for r in rows:
        writer.writerow(
            [r.path, r.split, r.speaker, r.source_package, r.licence, f"{r.duration_s:.3f}", "|".join(r.sources)]
        )
    atomic_write_text(path, buffer.getvalue())


def corpus_stats(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        chosen = [r for r in rows if r.split == split]
        speakers = {r.speaker for r in chosen}
        stats[split] = {
            "speakers": len(speakers),
            "real_speakers": len({r.speaker for r in chosen if not r.speaker.startswith("synth-")}),
            "files": len(chosen),
            "hours": round(sum(r.duration_s for r in chosen) / 3600.0, 3),
        }
    return stats


def write_licenses(out: Path, packages: dict[str, tuple[Path, str]], synthetic: bool) -> None:
    lines = [
        "# Licences of the offline speech corpus",
        "",
        "Every file in this corpus is derived from the Debian package named in `manifest.csv`",
        "(decoded, resampled to 16 kHz mono, silence-trimmed, level-normalised and concatenated).",
        "Each package's full Debian copyright file is copied under `licenses/`.",
        "",
        "| package | version | licence (summary) | DEP-5 License fields | content |",
        "|---|---|---|---|---|",
    ]
    for name, (root, version) in packages.items():
        copyright_file = root / "usr/share/doc" / name / "copyright"
        text = copyright_file.read_text(errors="replace") if copyright_file.is_file() else ""
        if text:
            atomic_write_text(out / "licenses" / f"{name}.copyright", text)
        spec = PACKAGES[name]
        fields = ", ".join(licence_lines(text)) or "free-form copyright file"
        lines.append(f"| {name} | {version} | {spec.licence} | {fields} | {spec.note} |")
    if synthetic:
        lines += [
            "",
            "Synthetic speakers (`synth-*`) were generated by espeak-ng (GPL-3+) and flite (BSD-like)",
            "from sentences written for this recipe and dedicated to the public domain; the generated",
            "audio is not a derivative of the engines' code.",
        ]
    atomic_write_text(out / "LICENSES.md", "\n".join(lines) + "\n")


def build_corpus(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    # "a,b c": commas as well as spaces separate the names
    names = [name for item in args.packages for name in item.split(",") if name]
    packages = [check_package_allowed(p) for p in names]  # before anything is downloaded or written
    unknown = [p for p in packages if p not in PACKAGES]
    if unknown:
        raise ValueError(f"no speech selector for package(s) {unknown}; known: {sorted(PACKAGES)}")
    engines = tuple(e for e in ("espeak-ng", "flite") if shutil.which(e))
    if args.synthetic and not engines:  # before the downloads, not after every real speaker was written
        raise FileNotFoundError(
            "neither espeak-ng nor flite is installed: `apt-get install espeak-ng flite`, or pass --no-synthetic"
        )
    if not any(not PACKAGES[p].train_only for p in packages):
        raise ValueError(f"the valid and test splits need a package that is not train-only; {packages} are all "
                         f"train-only (add e.g. {next(p for p in PACKAGES if not PACKAGES[p].train_only)})")
    held_out = sorted(p for p in PACKAGES if not PACKAGES[p].train_only)
    if sorted(p for p in packages if not PACKAGES[p].train_only) != held_out:
        print(f"warning: the held-out (valid / test) speakers are drawn from {len(held_out)} packages by default; "
              "with another set of them the splits differ from the default corpus's, on which the shipped model "
              "was trained and scored: starting from it, its training speakers may be in your valid / test splits",
              file=sys.stderr)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"output folder {out} is not empty: pass --overwrite to rebuild it")
        for folder in (*SPLITS, "licenses"):  # (the licences of packages no longer used must go too)
            shutil.rmtree(out / folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    fetched = {name: fetch_package(name, args.cache) for name in packages}
    clips = collect_clips({name: root for name, (root, _) in fetched.items()})
    by_speaker: dict[str, list[Clip]] = defaultdict(list)
    package_of: dict[str, str] = {}
    for package, clip in clips:
        by_speaker[clip.speaker].append(clip)
        package_of[clip.speaker] = package
    enough = {s: c for s, c in by_speaker.items() if len(c) >= args.min_clips}
    train_only = sorted(s for s in enough if PACKAGES[package_of[s]].train_only)
    infos = [SpeakerInfo(s, c[0].family, c[0].tie) for s, c in enough.items() if s not in train_only]
    assignment = split_speakers(infos, args.valid_fraction, args.test_fraction, args.seed)

    rows: list[Row] = []
    cache_root = args.cache / "unpacked"

    def write_real_speaker(speaker: str, split: str, rng: random.Random) -> None:
        package = package_of[speaker]
        waves = _real_waves(by_speaker[speaker], cache_root, rng, args.min_seconds, args.trim_db)
        rows.extend(
            write_speaker(
                out,
                split,
                speaker,
                package,
                PACKAGES[package].licence,
                waves,
                args.max_minutes_per_speaker * 60,
                args.pack_seconds,
                args.gap_seconds,
            )
        )
        print(f"{split:5s} {speaker}: {sum(r.duration_s for r in rows if r.speaker == speaker):.0f} s", flush=True)

    rng = random.Random(args.seed)
    for speaker in sorted(assignment):
        write_real_speaker(speaker, assignment[speaker], rng)
    # Train-only packages draw from a random sequence each (the shared rng's sequence stays as it was), so that
    # adding one changes no other file. hedgewars-data, the first of them, keeps the key it was built with.
    train_only_rngs: dict[str, random.Random] = {}
    for speaker in train_only:
        package = package_of[speaker]
        key = f"{args.seed}:train-only" if package == "hedgewars-data" else f"{args.seed}:train-only:{package}"
        write_real_speaker(speaker, "train", train_only_rngs.setdefault(package, random.Random(key)))
    if args.synthetic:
        for setting in synthetic_voices(args.synthetic_speakers, args.seed, engines):
            waves = _synthetic_waves(setting, args.synthetic_utterances, rng, args.trim_db)
            rows += write_speaker(
                out,
                "train",
                setting.speaker,
                setting.engine,
                "synthetic (see LICENSES.md)",
                waves,
                args.max_minutes_per_speaker * 60,
                args.pack_seconds,
                args.gap_seconds,
            )
            print(f"train {setting.speaker}", flush=True)

    write_manifest(out / "manifest.csv", rows)
    write_licenses(out, fetched, args.synthetic)
    stats = corpus_stats(rows)
    atomic_write_text(
        out / "stats.json",
        json.dumps(
            {
                "splits": stats,
                "speakers": {split: sorted({r.speaker for r in rows if r.split == split}) for split in SPLITS},
            },
            indent=2,
        )
        + "\n",
    )
    return stats


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="corpus folder to create")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache/mossformer2/offline_speech",
        help="where .deb files are downloaded and unpacked",
    )
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES),
                        help="Debian packages to use (spaces or commas between names)")
    parser.add_argument("--no-synthetic", dest="synthetic", action="store_false",
                        help="skip the synthetic voices (made unless this is given: synthetic=%(default)s; they need "
                             "espeak-ng or flite)")
    parser.add_argument("--synthetic-speakers", type=int, default=24)
    parser.add_argument("--synthetic-utterances", type=int, default=15, help="utterances per synthetic speaker")
    parser.add_argument("--max-minutes-per-speaker", type=float, default=8.0)
    parser.add_argument("--min-clips", type=int, default=10, help="drop real speakers with fewer clips")
    parser.add_argument("--min-seconds", type=float, default=0.25, help="drop clips shorter after trimming")
    parser.add_argument("--trim-db", type=float, default=-40.0, help="silence threshold below the loudest frame")
    parser.add_argument(
        "--pack-seconds",
        type=float,
        default=4.0,
        help="join a speaker's short clips into utterances of at least this length (0: off)",
    )
    parser.add_argument("--gap-seconds", type=float, default=0.15, help="silence between joined clips")
    parser.add_argument("--valid-fraction", type=float, default=0.12)
    parser.add_argument("--test-fraction", type=float, default=0.12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rebuild the splits of an existing corpus")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = build_corpus(args)
    except (ValueError, FileNotFoundError, OSError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, values in stats.items():
        print(
            f"{split:5s}: {values['speakers']} speakers ({values['real_speakers']} real), "
            f"{values['files']} files, {values['hours']:.2f} h"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
