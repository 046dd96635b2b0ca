"""Pack the offline corpus small enough to travel to a time-boxed GPU machine (Ogg Opus, train + valid subset).

The wav corpus (about 550 MB) is far over what a lent GPU call can carry (64 MiB with the code). Opus at
compression level 0.92 (25 kbit/s for 16 kHz speech) brings 3.9 h of training speech to about 44 MiB.
Lossy coding changes the waveform (median SI-SDR of a coded file against its source is about 19 dB), but the
mixtures are built from the coded sources, so targets and mixtures stay consistent; final scores are measured
on the wav corpus. Layout and speaker folders are kept, so ``data.dynamic_mixing.train_utterances`` can point at
``<out>/train``::

    python recipes/offline_speech/pack_corpus.py --corpus /work/corpus --out .corpus_pack

The output is written to a temporary folder and renamed at the end: an interrupted or oversize pack leaves
nothing behind. ``<out>/pack.json`` records what was packed and the measured coding quality.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from mossformer2.metrics import si_sdr

SAMPLE_RATE = 16000
SPLITS = ("train", "valid")


def select_rows(manifest: Path, valid_files_per_speaker: int) -> list[dict[str, str]]:
    """Every train row, and the first ``valid_files_per_speaker`` valid rows of each valid speaker (0: all)."""
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] in SPLITS]
    if not rows:
        raise ValueError(f"{manifest} lists no train or valid files")
    kept, per_speaker = [], defaultdict(int)
    for row in sorted(rows, key=lambda r: r["path"]):
        if row["split"] == "valid" and valid_files_per_speaker:
            if per_speaker[row["speaker"]] >= valid_files_per_speaker:
                continue
            per_speaker[row["speaker"]] += 1
        kept.append(row)
    return kept


def pack(corpus: Path, out: Path, level: float, valid_files_per_speaker: int, max_mib: float) -> dict:
    manifest = corpus / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: build the corpus with prepare.py first")
    if out.exists():
        raise ValueError(f"{out} exists: remove it or choose another --out")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"--level must be in [0, 1], got {level}")
    rows = select_rows(manifest, valid_files_per_speaker)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        scores, seconds, packed_rows, size = [], defaultdict(float), [], 0
        for row in rows:
            audio, rate = sf.read(corpus / row["path"], dtype="float32")
            if rate != SAMPLE_RATE or audio.ndim != 1:
                raise ValueError(f"{row['path']}: expected {SAMPLE_RATE} Hz mono, got {rate} Hz, shape {audio.shape}")
            rel = Path(row["path"]).with_suffix(".opus")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(tmp / rel, audio, SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=level)
            size += (tmp / rel).stat().st_size
            if size > max_mib * 2**20:  # stop at once rather than after encoding everything
                raise ValueError(
                    f"packed audio passes {size / 2**20:.1f} MiB at {row['path']}, over --max-mib {max_mib:g}: "
                    "raise --level (lower bitrate) or lower --valid-files-per-speaker"
                )
            coded, _ = sf.read(tmp / rel, dtype="float32")  # same length: libsndfile drops Opus' pre-skip
            scores.append(si_sdr(coded, audio))
            seconds[row["split"]] += len(audio) / SAMPLE_RATE
            packed_rows.append({**row, "path": rel.as_posix()})
        with (tmp / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(packed_rows[0]))
            writer.writeheader()
            writer.writerows(packed_rows)
        for extra in ("LICENSES.md", "licenses"):
            source = corpus / extra
            if source.is_dir():
                shutil.copytree(source, tmp / extra)
            elif source.is_file():
                shutil.copy2(source, tmp / extra)
        summary = {
            "source": str(corpus),
            "codec": "Ogg Opus (libsndfile)",
            "compression_level": level,
            "files": {split: sum(r["split"] == split for r in packed_rows) for split in SPLITS},
            "speakers": {split: len({r["speaker"] for r in packed_rows if r["split"] == split}) for split in SPLITS},
            "hours": {split: round(seconds[split] / 3600, 3) for split in SPLITS},
            "audio_mib": round(size / 2**20, 2),
            "kbit_per_s": round(size * 8 / max(sum(seconds.values()), 1e-9) / 1000, 1),
            "coded_si_sdr_db": {
                "median": round(float(np.median(scores)), 2),
                "p10": round(float(np.percentile(scores, 10)), 2),
            },
            "valid_files_per_speaker": valid_files_per_speaker,
        }
        (tmp / "pack.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, required=True, help="corpus built by prepare.py")
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must not exist)")
    parser.add_argument("--level", type=float, default=0.92,
                        help="libsndfile Opus compression level (0.9: 30 kbit/s, 0.92: 25, 1.0: 7 and unusable)")
    parser.add_argument(
        "--valid-files-per-speaker", type=int, default=15, help="valid files kept per held-out speaker (0: all)"
    )
    parser.add_argument("--max-mib", type=float, default=52.0, help="refuse a pack larger than this")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = pack(args.corpus, args.out, args.level, args.valid_files_per_speaker, args.max_mib)
    except (ValueError, FileNotFoundError, OSError, sf.LibsndfileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
