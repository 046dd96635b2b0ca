"""A small synthetic speaker corpus for smoke tests and ``data.synthetic: true``.

Each "speaker" has its own pitch range and vocal-tract size; an utterance is a run of voiced syllables: a
harmonic glottal source with a gliding pitch contour, shaped by three formant resonators (a vowel per syllable,
scaled by the speaker's tract length), with short pauses between words. Mixtures of two such voices are
separable by pitch and formant cues like real speech, unlike white noise.
Written as ``<root>/<speaker>/<n>.wav`` (16-bit), the layout dynamic mixing reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from mossformer2.audio import write_audio

# (F1, F2, F3) in Hz of a few vowels of an adult male voice.
_VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480],
                    [570, 840, 2410], [660, 1720, 2410], [440, 1020, 2240], [490, 1350, 1690]], dtype=np.float64)


def _resonator(x: np.ndarray, freq: float, bandwidth: float, sample_rate: int) -> np.ndarray:
    """Two-pole resonance at ``freq`` with unit gain at DC."""
    r = np.exp(-np.pi * bandwidth / sample_rate)
    theta = 2 * np.pi * freq / sample_rate
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([sum(a)], a, x)


def synth_utterance(rng: np.random.Generator, sample_rate: int, seconds: float, f0: float,
                    tract_scale: float) -> np.ndarray:
    """One utterance ``[T]`` float32 of a voice with mean pitch ``f0`` Hz and formant scale ``tract_scale``."""
    total = int(seconds * sample_rate)
    out = np.zeros(total)
    pos = int(rng.uniform(0.0, 0.15) * sample_rate)
    phase = 0.0
    while pos < total:
        n = int(rng.uniform(0.12, 0.32) * sample_rate)
        t = np.arange(n) / sample_rate
        # Pitch: per-syllable glide plus a slow vibrato around the speaker's mean.
        start, end = f0 * rng.uniform(0.8, 1.25, size=2)
        pitch = np.linspace(start, end, n) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
        phases = phase + 2 * np.pi * np.cumsum(pitch) / sample_rate
        phase = float(phases[-1])
        harmonics = np.arange(1, int(0.45 * sample_rate / pitch.max()) + 1)
        # Harmonic glottal source with a -12 dB/octave-ish roll-off and a little breath noise.
        source = (np.sin(harmonics[:, None] * phases[None, :]) / harmonics[:, None] ** 1.2).sum(0)
        source += 0.02 * rng.standard_normal(n)
        formants = _VOWELS[rng.integers(len(_VOWELS))] * tract_scale
        voiced = source
        for f, bw in zip(formants, (80.0, 100.0, 140.0)):
            if f < 0.45 * sample_rate:
                voiced = _resonator(voiced, f, bw, sample_rate)
        envelope = np.sin(np.pi * np.linspace(0, 1, n)) ** 0.6
        seg = voiced * envelope * rng.uniform(0.5, 1.0)
        end_pos = min(total, pos + n)
        out[pos:end_pos] += seg[:end_pos - pos]
        pos = end_pos + int(rng.choice([0.01, 0.03, rng.uniform(0.08, 0.3)]) * sample_rate)
    peak = np.abs(out).max()
    return (0.5 * out / peak if peak > 0 else out).astype(np.float32)


def generate_speaker_corpus(root: str | Path, num_speakers: int, utterances_per_speaker: int,
                            seconds: float = 2.0, sample_rate: int = 16000, seed: int = 0,
                            voices: Sequence[int] | None = None) -> Path:
    """Write ``<root>/spk<k>/<n>.wav`` for every speaker and utterance; return ``root``.

    ``num_speakers`` voices have their mean pitches spread over 90-260 Hz and their formant scales over 0.75-1.45
    (log scales, rising together as from male to female voices), so that any two speakers differ in voice.
    ``voices``: write only these of them (speaker ``k`` is voice ``k`` of that spread): a held-out split takes
    voices interleaved with the training ones, so that no voice (nor speaker name) is in both.
    """
    if voices is not None and (len(set(voices)) != len(voices) or not all(0 <= k < num_speakers for k in voices)):
        raise ValueError(f"voices must be distinct indices below num_speakers ({num_speakers}), got {list(voices)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    pitches = np.geomspace(90, 260, num_speakers)
    scales = np.geomspace(0.75, 1.45, num_speakers)  # higher voices have shorter tracts, as in real speech
    for k in range(num_speakers) if voices is None else voices:
        for n in range(utterances_per_speaker):
            length = seconds * rng.uniform(0.7, 1.0)
            wave = synth_utterance(rng, sample_rate, length, float(pitches[k]), float(scales[k]))
            write_audio(root / f"spk{k:02d}" / f"{n:03d}.wav", wave, sample_rate)
    return root
