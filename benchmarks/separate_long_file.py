"""Peak memory and real-time factor of separating one long file, chunk by chunk, on the CPU.

Generates an N-minute 16 kHz two-talker-like WAV (written block by block, never held twice), separates it with
``Separator.separate_file`` and prints peak RSS (``resource.getrusage``) and the real-time factor. Run it for two
lengths to see that memory grows only with the audio arrays (input + S outputs, float32), not with chunk count::

    python benchmarks/separate_long_file.py --minutes 60 --model tiny
    python benchmarks/separate_long_file.py --minutes 10 --model default --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SR = 16000


def peak_rss_mib(seen: float = 0.0) -> float:
    """Lifetime peak of resident memory, at least ``seen`` (a VmRSS read earlier): the kernel's RSS counters are
    per-CPU approximations, and ``ru_maxrss`` was seen 0.1 MiB under an earlier VmRSS."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seen)  # Linux reports KiB


def current_rss_mib() -> float:
    """Resident memory now (VmRSS), not the lifetime peak that ``ru_maxrss`` reports."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_long_mixture(path: Path, minutes: float, seed: int = 0, sample_rate: int = SR, channels: int = 1) -> float:
    """Two amplitude-modulated noise 'talkers', one minute per block (with 2 channels, each talker louder in one).
    Returns the duration in seconds."""
    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * sample_rate)
    with sf.SoundFile(str(path), "w", sample_rate, channels, subtype="PCM_16") as f:
        for start in range(0, total, 60 * sample_rate):
            n = min(60 * sample_rate, total - start)
            t = (start + np.arange(n)) / sample_rate
            a = 0.05 * rng.standard_normal(n) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t)) ** 2
            b = 0.1 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4.3 * t + 1)) ** 2
            mix = a + b if channels == 1 else np.stack([a + 0.5 * b, 0.5 * a + b], axis=1)
            f.write(mix.astype(np.float32))
    return total / sample_rate


def load(model: str):
    from mossformer2 import build_model, load_model
    from mossformer2.models.config import tiny_test_config
    from mossformer2.pretrained import load_default_model

    if model == "tiny":
        torch.manual_seed(0)
        return build_model(tiny_test_config()).eval()
    if model == "default":
        return load_default_model("cpu")
    return load_model(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--sample-rate", type=int, default=SR, help="of the generated file (default 16000)")
    parser.add_argument("--channels", type=int, choices=[1, 2], default=1, help="of the generated file (mixed down)")
    parser.add_argument("--model", default="tiny", help="tiny (random), default (shipped) or a checkpoint path")
    parser.add_argument("--chunk-seconds", type=float, default=10.0)
    parser.add_argument("--overlap-seconds", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refinements", action=argparse.BooleanOptionalAction, default=None,
                        help="every refinement on / off (default: as the model recommends)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--default-allocator", action="store_true",
                        help="skip keep_freed_memory_for_reuse() (which the mossformer2 command applies)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.default_allocator:
        from mossformer2.utils import keep_freed_memory_for_reuse

        keep_freed_memory_for_reuse()

    from mossformer2.separation import Separator
    from mossformer2.separation_settings import REFINEMENTS

    model = load(args.model)
    rss_model = current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "long.wav"
        seconds = write_long_mixture(src, args.minutes, sample_rate=args.sample_rate, channels=args.channels)
        sep = Separator(model, device="cpu", chunk_seconds=args.chunk_seconds,
                        overlap_seconds=args.overlap_seconds, batch_size=args.batch_size, progress=True,
                        **{name: args.refinements for name in REFINEMENTS})
        start = time.perf_counter()
        outputs = sep.separate_file(src, Path(tmp) / "out")
        elapsed = time.perf_counter() - start
        assert all(sf.info(str(p)).frames == int(seconds * args.sample_rate) for p in outputs)
    audio_mib = seconds * args.sample_rate * 4 * (args.channels + sep.num_spks) / 2**20  # input [C, T] + outputs
    result = {"minutes": args.minutes, "sample_rate": args.sample_rate, "channels": args.channels,
              "model": args.model, "threads": args.threads,
              "chunk_seconds": args.chunk_seconds, "overlap_seconds": args.overlap_seconds,
              "batch_size": args.batch_size, "peak_rss_mib": round(peak_rss_mib(rss_model), 1),
              "rss_after_model_load_mib": round(rss_model, 1), "float32_audio_arrays_mib": round(audio_mib, 1),
              **sep.refinements,
              "seconds": round(elapsed, 1), "rtf": round(elapsed / seconds, 4),
              "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
