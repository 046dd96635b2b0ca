"""Audio file I/O (soundfile, PyAV fallback), resampling (soxr) and channel handling.

Waveforms are numpy float32 arrays: ``[C, T]`` (channels first) or ``[T]`` for mono.
"""

from __future__ import annotations

import contextlib
import errno
import io
import numbers
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
import soxr

from mossformer2.utils import atomic_path

# File suffixes that folder scans (datasets, `mossformer2 separate DIR`) pick up: libsndfile's formats, then the
# containers read_audio decodes with PyAV.
AUDIO_SUFFIXES = frozenset({
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64", ".sph",
    ".m4a", ".aac", ".mp4", ".mka", ".webm", ".wma",
})
WRITE_FORMATS = {"wav": "WAV", "flac": "FLAC"}
SAMPLE_BYTES = {"PCM_16": 2, "PCM_24": 3, "FLOAT": 4}  # the subtypes write_audio takes, and their sizes
WRITE_SUBTYPES = tuple(SAMPLE_BYTES)
# Hz, for inputs and outputs: outside, a typo or a broken header, not a recording's rate (768 kHz is the highest
# rate audio interfaces offer; --output-rate 4410000 would make an output 100 times the input's size).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000
# Mixture folders of a set: wsj0-2mix's (and `mossformer2 mix`'s) and LibriMix / WHAM!'s.
MIXTURE_FOLDERS = ("mix", "mix_clean", "mix_both", "mix_single")


def check_sample_rate_option(rate: int, option: str) -> int:
    """``rate`` unless it lies outside ``MIN_SAMPLE_RATE`` .. ``MAX_SAMPLE_RATE`` (``--output-rate 1`` once wrote a
    1 Hz file; 2**31 crashed libsndfile): a ValueError naming the command-line ``option``."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{option} must be {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, got {rate}")
    return rate


def has_audio_suffix(path: str | Path) -> bool:
    """Whether ``path`` (a name or a list field) ends in one of :data:`AUDIO_SUFFIXES`, in any case."""
    return Path(path).suffix.lower() in AUDIO_SUFFIXES


def find_audio_files(folder: str | Path) -> list[Path]:
    """The files under ``folder`` (recursive) with an audio suffix, sorted. Hidden names (``.x``) are skipped,
    folders included: macOS ``._x.wav`` sidecars are not audio, and ``.x_s1.*.tmp.wav`` are temp files that a
    killed run left behind (``atomic_path``)."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(parent, name) for name in names if not name.startswith(".") and has_audio_suffix(name))
    return sorted(p for p in found if p.is_file())  # a link to a file counts, a dangling one does not


def holds_mixture_set(folder: Path) -> bool:
    """Whether ``folder`` holds a set of mixtures: ``s1/`` beside ``mix/`` (wsj0-2mix, ``mossformer2 mix``) or a
    LibriMix mixture folder."""
    return (folder / "s1").is_dir() and any((folder / name).is_dir() for name in MIXTURE_FOLDERS)


def speaker_folders(root: str | Path) -> list[Path]:
    """The speaker folders of a ``<root>/<speaker>/`` corpus: the folders directly in ``root``, sorted; hidden ones
    (``.x``) skipped. A set of mixtures (:func:`holds_mixture_set`) as ``root`` or among its folders is refused:
    its mixture and reference folders would count as speakers, or its mixtures as one more speaker's recordings."""
    root = Path(root)
    if holds_mixture_set(root):
        raise ValueError(f"{root} is a set of mixtures (mix/, s1/, ...), not a folder of speaker folders "
                         "(ROOT/<speaker>/*.wav): use the single-speaker recordings it was mixed from")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:  # at any depth: a speaker's audio is searched recursively
        for candidate in (folder, *(m.parent for m in folder.rglob("mix*") if m.name in MIXTURE_FOLDERS)):
            if holds_mixture_set(candidate):
                raise ValueError(f"{candidate} holds a set of mixtures (mix/, s1/, ...), not a speaker's recordings: "
                                 f"move it out of {root}, whose folders are taken as speakers")
    return folders


def soundfile_name(path: str | Path) -> str | bytes:
    """``path`` as soundfile must get it. soundfile encodes a str name strictly, so a name that is not valid in
    the file-system encoding (a Latin-1 name on a UTF-8 system, which Python holds as surrogates) goes as bytes."""
    name = os.fspath(path)
    try:
        name.encode(sys.getfilesystemencoding())
    except UnicodeEncodeError:
        return os.fsencode(name)
    return name


def read_audio(path: str | Path | BinaryIO) -> tuple[np.ndarray, int]:
    """Read any audio file as float32 ``[C, T]`` in [-1, 1] (ints scaled) and its sample rate.

    libsndfile handles wav/flac/ogg/mp3/aiff...; other containers (m4a, aac, opus-in-webm, ...) go through PyAV.
    ``path`` may also be a binary file object open for reading (``io.BytesIO(uploaded_bytes)``, ``open(f, "rb")``),
    read from its current position.
    Raises FileNotFoundError for a missing path and ValueError for empty, non-audio or undecodable files.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        raise TypeError("read_audio takes a path or a binary file object: for audio bytes pass io.BytesIO(data)")
    if hasattr(path, "read"):
        name = getattr(path, "name", None) or type(path).__name__
        data = path.read()
        if isinstance(data, str):
            raise ValueError(f"{name} is open in text mode: open audio in binary mode ('rb')")
        data = bytes(data)
        if not data:
            raise ValueError(f"no bytes to read from {name} (empty, or already read to its end)")
        wave, sample_rate = _decode(lambda: io.BytesIO(data), lambda: io.BytesIO(data), name)  # (a copy each)
        declared = _declared_frames(io.BytesIO(data))
    else:
        path = name = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such audio file: {path}")
        if not path.is_file():
            raise ValueError(f"not a file: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"empty file (0 bytes): {path}")
        wave, sample_rate = _decode(lambda: soundfile_name(path), lambda: str(path), path)
        declared = wav_declared_frames(path)
    if declared is not None and declared > wave.shape[-1]:
        warnings.warn(f"{name} is truncated: its header declares {declared / sample_rate:.2f} s of audio, the file "
                      f"holds {wave.shape[-1] / sample_rate:.2f} s; using what is there", stacklevel=2)
    return wave, sample_rate


def _decode(for_soundfile: Callable[[], Any], for_pyav: Callable[[], Any], name: str | Path) -> tuple[np.ndarray, int]:
    """Decode with libsndfile, else PyAV; ``for_*`` give each its source (a name or a file object)."""
    try:
        wave, sample_rate = _read_channels_first(for_soundfile())
    # (MemoryError: a damaged header claiming thousands of hours, which libsndfile allocates up front)
    except (sf.LibsndfileError, RuntimeError, TypeError, MemoryError, OverflowError) as sf_err:
        try:
            wave, sample_rate = _read_with_pyav(for_pyav())
        except ValueError as av_err:
            raise ValueError(f"cannot read {name} as audio: {av_err} (libsndfile: {sf_err})") from None
    if wave.shape[-1] == 0:
        # A WAV whose writer never filled in its sizes (RIFF and data 0): libsndfile reads no frames, FFmpeg
        # reads the data that follows the header.
        try:
            wave, sample_rate = _read_with_pyav(for_pyav())
        except ValueError:
            raise ValueError(f"audio file has no samples: {name}") from None
    return wave, int(sample_rate)


def _read_channels_first(source: Any, block: int = 1 << 18) -> tuple[np.ndarray, int]:
    """Decode with libsndfile into float32 ``[C, T]`` block by block: reading ``[T, C]`` whole and transposing
    held two copies of a multichannel recording at once (2.4 GiB for an hour of 44.1 kHz stereo)."""
    with sf.SoundFile(source) as f:
        wave = np.empty((f.channels, f.frames), dtype=np.float32)  # frames: what the header promises
        buffer = np.empty((min(block, max(f.frames, 1)), f.channels), dtype=np.float32)
        filled = 0
        while filled < wave.shape[1]:
            # read() returns what it decoded: a cut-off MP3 stops short of its header's length (blocks() would
            # hand back the whole buffer, stale samples included)
            part = f.read(min(len(buffer), wave.shape[1] - filled), dtype="float32", always_2d=True, out=buffer)
            if not len(part):
                break
            wave[:, filled:filled + len(part)] = part.T
            filled += len(part)
        return (wave if filled == wave.shape[1] else wave[:, :filled].copy()), f.samplerate


# Writers that stream a WAV to a pipe leave its data size unset: 0, 0xFFFFFFFF or another value near the 32-bit
# limit. Sizes from here on are taken as unknown (a real file that large is 2 GiB).
STREAMED_WAV_SIZE = 0x7FFF0000


def wav_declared_frames(path: str | Path) -> int | None:
    """The frame count a RIFF/WAVE header declares (its data chunk's size over the block size), read without
    decoding; None for other formats, RF64, and streamed files whose writer left the size unset (0, or a
    placeholder of ``STREAMED_WAV_SIZE`` or more).
    libsndfile reports only the frames present, so this is how a cut-off download or copy shows."""
    try:
        with open(path, "rb") as f:
            return _declared_frames(f)
    except OSError:
        return None


def _declared_frames(f: BinaryIO) -> int | None:
    """:func:`wav_declared_frames` of a binary stream at its start."""
    if f.read(4) != b"RIFF" or len(f.read(4)) != 4 or f.read(4) != b"WAVE":
        return None
    block_align = None
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        chunk_id, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        skip = size + (size & 1)  # chunks are padded to an even size
        if chunk_id == b"fmt ":
            fmt = f.read(size)
            if len(fmt) < 14:
                return None
            block_align = int.from_bytes(fmt[12:14], "little")
            skip -= len(fmt)
        elif chunk_id == b"data":
            if not block_align or size == 0 or size >= STREAMED_WAV_SIZE:
                return None
            return size // block_align
        f.seek(skip, 1)


def audio_header(path: str | Path) -> Any | None:
    """libsndfile's header of an audio file (``.samplerate``, ``.channels``, ...) without decoding it; None for a
    file it cannot read (a PyAV format, a damaged or missing file: :func:`read_audio` then decides)."""
    try:
        return sf.info(soundfile_name(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None


def audio_sample_rate(path: str | Path) -> int:
    """The sample rate of an audio file, from its header where libsndfile reads the format (no decoding); other
    containers are decoded (:func:`read_audio`, which also raises its errors for missing or unreadable files)."""
    header = audio_header(path)
    return int(header.samplerate) if header is not None else read_audio(path)[1]


def _read_with_pyav(path: str | BinaryIO) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of a file (or binary file object) with PyAV into float32 ``[C, T]``."""
    try:
        import av
    except ImportError:
        raise ValueError("libsndfile cannot read it and PyAV, which decodes other formats, is not installed "
                         "(pip install av)") from None

    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise ValueError(f"not a recognised audio/video container ({err})") from None
    with container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        stream = container.streams.audio[0]
        pieces: list[np.ndarray] = []
        try:
            # Planar float output keeps channels separate: each frame gives [C, n]. (A stream FFmpeg has no codec
            # for, e.g. a WAV format tag it does not know, has no layout: AttributeError.)
            resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate)
            for frame in container.decode(stream):
                pieces.extend(f.to_ndarray() for f in resampler.resample(frame))
            pieces.extend(f.to_ndarray() for f in resampler.resample(None))
        except (av.error.FFmpegError, AttributeError, TypeError) as err:
            raise ValueError(f"audio stream could not be decoded ({err})") from None
        sample_rate = stream.rate
    if not pieces:
        raise ValueError("the audio stream holds no samples")
    return np.ascontiguousarray(np.concatenate(pieces, axis=-1), dtype=np.float32), int(sample_rate)


def pcm_to_float(wave: np.ndarray) -> np.ndarray:
    """float32 samples of ``wave``: floats as they are, integer PCM (8 to 32 bits, as ``scipy.io.wavfile.read``
    gives it) scaled to [-1, 1) as libsndfile (and so ``read_audio``) reads it: signed n-bit / 2**(n-1), unsigned
    (8-bit WAV) centred on 2**(n-1) first. 64-bit integers have no PCM scale: a ValueError."""
    wave = np.asarray(wave)
    if not (np.issubdtype(wave.dtype, np.integer) or np.issubdtype(wave.dtype, np.floating)):
        raise ValueError(f"audio of dtype {wave.dtype} is not audio samples: pass float samples in [-1, 1] or "
                         "int16 / int32 / uint8 PCM")  # bool masks ran as 0 / 1, complex lost its imaginary part
    if not np.issubdtype(wave.dtype, np.integer):
        with np.errstate(over="ignore"):  # said below, in words
            samples = wave.astype(np.float32, copy=False)
        if samples is not wave and np.isinf(samples).any() and np.isfinite(wave).all():  # not "NaN or infinite"
            raise ValueError(f"audio samples reach {peak_amplitude(wave):.3g}, beyond float32's range (3.4e38): "
                             "pass float samples in [-1, 1]")
        return samples
    if wave.dtype.itemsize > 4:  # e.g. a list of Python ints: full scale 2**63 would silence it
        raise ValueError(f"audio of dtype {wave.dtype} has no PCM full scale: pass float samples in [-1, 1] or "
                         "int16 / int32 / uint8 PCM")
    half = float(2 ** (8 * wave.dtype.itemsize - 1))
    scaled = wave.astype(np.float32)
    if np.issubdtype(wave.dtype, np.unsignedinteger):
        scaled -= half
    scaled /= half
    return scaled


def resampled_length(num_samples: int, orig_sr: int, target_sr: int) -> int:
    """The length ``resample`` returns, computed as soxr computes it: ``num_samples / (orig_sr / target_sr)`` in
    double precision, rounded half up. (Python's ``round`` rounds half to even: one sample short at 32 kHz ->
    16 kHz for odd lengths; exact arithmetic was one sample long where the double quotient falls just under a
    half, e.g. 1000 samples at 24 kHz -> 1837 at 44.1 kHz.)"""
    return int(num_samples / (orig_sr / target_sr) + 0.5)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """High-quality soxr resampling of ``[T]`` or ``[C, T]`` float audio; same layout, float32."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave
    if wave.ndim == 1:
        return soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    if wave.ndim != 2:
        raise ValueError(f"expected audio [T] or [C, T], got shape {wave.shape}")
    # Row by row into the result: soxr takes [T, C], and transposing in and out held three copies at once.
    out = np.empty((wave.shape[0], resampled_length(wave.shape[1], orig_sr, target_sr)), dtype=np.float32)
    for row, channel in zip(out, wave):
        row[:] = soxr.resample(channel, orig_sr, target_sr, quality="HQ")
    return out


def to_mono(wave: np.ndarray) -> np.ndarray:
    """Average the channels of ``[C, T]`` to ``[T]``; ``[T]`` passes through."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        return wave
    if wave.ndim != 2:
        raise ValueError(f"expected audio [T] or [C, T], got shape {wave.shape}")
    if wave.shape[0] == 1:
        return wave[0]  # no copy: long mono files stay one array
    return wave.mean(axis=0, dtype=np.float32)


def mean_square(wave: np.ndarray, block: int = 1 << 18) -> np.ndarray:
    """Mean square over the last axis (float64, shape ``wave.shape[:-1]``; 0 for no samples), summed in float64
    over blocks of ``block`` samples: no full-length float64 copy of an hour-long recording."""
    wave = np.asarray(wave)
    total = np.zeros(wave.shape[:-1])
    for start in range(0, wave.shape[-1], block):
        part = wave[..., start:start + block].astype(np.float64)
        total += np.einsum("...t,...t->...", part, part)
    return total / max(wave.shape[-1], 1)


def peak_amplitude(wave: np.ndarray) -> float:
    """``max |wave|`` without the full-size temporary ``np.abs`` makes (hundreds of MB for an hour of audio)."""
    return float(max(wave.max(), -wave.min())) if wave.size else 0.0


def _peak_over_full_scale(wave: np.ndarray, subtype: str) -> float | None:
    """The peak of ``wave`` if an integer ``subtype`` cannot hold it, else None (NaN passes: the writer's error)."""
    if subtype.upper() == "FLOAT":
        return None
    peak = peak_amplitude(wave)
    return peak if peak > 1.0 else None


def clip_guard(wave: np.ndarray, subtype: str, name: str) -> np.ndarray:
    """Clip to [-1, 1] with a warning naming ``name`` when an integer ``subtype`` would otherwise wrap."""
    peak = _peak_over_full_scale(wave, subtype)
    if peak is None:
        return wave
    warnings.warn(f"{name}: peak {peak:.3f} exceeds full scale; clipping to [-1, 1] for {subtype}",
                  stacklevel=3)
    return np.clip(wave, -1.0, 1.0)


def fit_to_full_scale(waves: np.ndarray, subtype: str, name: str, headroom: float = 0.99) -> np.ndarray:
    """Scale all of ``waves`` by one gain so that the loudest sample fits an integer ``subtype`` (warns, naming
    ``name``). For the speaker outputs of one recording: a model trained with a scale-invariant loss may output
    any level, and one gain keeps their relative levels, where clipping would distort them. FLOAT passes."""
    peak = _peak_over_full_scale(waves, subtype)
    if peak is None:
        return waves
    gain = headroom / peak
    warnings.warn(f"{name}: outputs peak at {peak:.3f}, over full scale for {subtype}: all scaled by {gain:.3g} "
                  f"({20 * np.log10(gain):.1f} dB) together", stacklevel=3)
    return np.multiply(waves, gain, dtype=np.float32)


def check_writable(format: str, channels: int, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Raise ValueError, naming the cause, when a ``format`` ("wav" / "flac") file of ``channels`` channels at
    ``sample_rate`` Hz in ``subtype`` cannot be written (FLAC: integer samples, at most 8 channels, rates up to
    655350 Hz). libsndfile decides, by opening an in-memory file; its own message names neither the file nor,
    for too many channels, the cause ("Format not recognised")."""
    fmt = WRITE_FORMATS[format]
    if not sf.check_format(fmt, subtype):  # FLOAT in FLAC: WAV takes every subtype of WRITE_SUBTYPES
        raise ValueError(f"{fmt} cannot store {subtype} samples: use subtype PCM_16 or PCM_24 "
                         "(--subtype), or the WAV format (--format wav)")

    def opens(num_channels: int, rate: int) -> bool:
        try:
            sf.SoundFile(io.BytesIO(), "w", rate, num_channels, subtype, format=fmt).close()
        except (sf.LibsndfileError, ValueError):
            return False
        return True

    if not opens(channels, sample_rate):
        cause = f"{channels} channels" if opens(1, sample_rate) else f"a sample rate of {sample_rate} Hz"
        advice = ": use the WAV format (--format wav)" if fmt != "WAV" else ""
        raise ValueError(f"{fmt} cannot store {cause}{advice}")


def write_audio(path: str | Path, wave: np.ndarray, sample_rate: int, subtype: str = "PCM_16",
                format: str | None = None, temp: Path | None = None) -> Path:
    """Write ``[T]`` or ``[C, T]`` atomically as wav/flac (format from the suffix unless given).

    Integer subtypes would wrap around on samples outside [-1, 1]; such samples are clipped with a warning.
    ``temp``: write there instead, a temporary file the caller renames onto ``path`` (``atomic_paths``, for files
    that appear together); messages still name ``path``.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in WRITE_FORMATS:
        raise ValueError(f"cannot write {path}: format must be one of {sorted(WRITE_FORMATS)}, got {fmt!r}")
    subtype = subtype.upper()
    if subtype not in WRITE_SUBTYPES:
        raise ValueError(f"subtype must be one of {WRITE_SUBTYPES}, got {subtype!r}")
    # integer PCM scaled as read_audio reads it (int16 was written unscaled: a full-scale square wave); bool and
    # complex arrays refused
    wave = pcm_to_float(wave)
    if wave.ndim not in (1, 2) or wave.shape[-1] == 0:
        raise ValueError(f"expected non-empty audio [T] or [C, T], got shape {wave.shape}")
    if isinstance(sample_rate, bool) or not (isinstance(sample_rate, numbers.Real)
                                             and float(sample_rate).is_integer()):
        raise ValueError(f"the sample rate must be a whole number of Hz, got {sample_rate!r}")
    sample_rate = check_sample_rate_option(int(sample_rate), "the sample rate")
    check_writable(fmt, 1 if wave.ndim == 1 else wave.shape[0], sample_rate, subtype)
    if not np.isfinite(wave).all():
        raise ValueError(f"refusing to write {path}: the audio contains NaN or infinite values")
    wave = clip_guard(wave, subtype, path.name)
    frames = wave if wave.ndim == 1 else wave.T  # soundfile wants [T, C]
    try:
        with atomic_path(path) if temp is None else contextlib.nullcontext(temp) as tmp:
            sf.write(soundfile_name(tmp), frames, int(sample_rate), subtype=subtype, format=WRITE_FORMATS[fmt])
    except sf.LibsndfileError as err:  # its message names the temp file: name the file asked for
        full = _disk_full(path.parent, frames.size * SAMPLE_BYTES[subtype])
        if full is not None:
            raise OSError(f"cannot write {path}: {full}") from None
        raise sf.LibsndfileError(err.code, prefix=f"cannot write {path}: ") from None
    return path


def _disk_full(folder: Path, needed: int) -> str | None:
    """Why a write of about ``needed`` bytes into ``folder`` failed if the disk is full, else None. libsndfile
    reports a failed write(2) as "System error." only; the free space, checked after the temp file is gone, tells."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= needed:
        return None
    return f"{os.strerror(errno.ENOSPC)} ({free / 1e6:.1f} MB free, about {needed / 1e6:.1f} MB needed)"
