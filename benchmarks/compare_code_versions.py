"""Time the full model of two checkouts of this package on the same input and weights, and compare outputs.

Used for benchmarks/RESULTS.md ("against the official op sequence"): the first commit's model runs the official
network's op sequence, so comparing it with the current code measures what the speed work changed.

    git worktree add /tmp/first 7f15e9c
    python benchmarks/compare_code_versions.py --baseline-src /tmp/first/src --threads 2

Each version runs in its own subprocess (both import ``mossformer2``), with and without the allocator setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
src, weights, out, tuned, threads, seconds, calls = sys.argv[1:8]
sys.path.insert(0, src)
import mossformer2
# A src without the package (a typo) would silently import the installed current code: refuse before timing.
if not Path(mossformer2.__file__).resolve().is_relative_to(Path(src).resolve()):
    sys.exit(f"mossformer2 was imported from {mossformer2.__file__}, not from under {src}")
from mossformer2 import MossFormer2Config, build_model
if tuned == "1":
    import ctypes
    libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-4, 0); libc.mallopt(-1, 2**30)  # as keep_freed_memory_for_reuse
torch.set_num_threads(int(threads))
model = build_model(MossFormer2Config()).eval()
try:
    model.load_state_dict(torch.load(weights, weights_only=True))
except FileNotFoundError:
    torch.manual_seed(0)
    model = build_model(MossFormer2Config()).eval()
    torch.save(model.state_dict(), weights)
x = 0.1 * torch.randn(1, int(float(seconds) * 16000), generator=torch.Generator().manual_seed(1))
times = []
with torch.inference_mode():
    model(x[:, :16000])
    for _ in range(int(calls)):
        start = time.perf_counter(); y = model(x); times.append(time.perf_counter() - start)
torch.save(y, out)
print(json.dumps({"module": mossformer2.__file__, "times": times}))
"""


def run_child(name: str, src: str, weights: str, out: str, tuned: str, threads: int, seconds: float,
              calls: int) -> dict:
    """Run CHILD for one checkout; on failure show its stderr (the reason) and stop."""
    proc = subprocess.run([sys.executable, "-c", CHILD, src, weights, out, tuned, str(threads), str(seconds),
                           str(calls)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{name} run (--{name}-src {src}) failed with exit status {proc.returncode}: "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", required=True, help="src/ folder of the baseline checkout")
    parser.add_argument("--current-src", default=str(Path(__file__).resolve().parents[1] / "src"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights.pt")
        runs = [("baseline", args.baseline_src, "0"), ("current", args.current_src, "0"),
                ("current", args.current_src, "1")]
        outputs = {}
        for name, src, tuned in runs:
            out = str(Path(tmp) / f"{name}{tuned}.pt")
            result = run_child(name, src, weights, out, tuned, args.threads, args.seconds, args.calls)
            outputs[name] = torch.load(out, weights_only=True)
            allocator = "keep_freed_memory_for_reuse" if tuned == "1" else "default"
            print(f"{name:9s} allocator {allocator:28s} " + "  ".join(f"{t:.2f} s" for t in result["times"])
                  + f"  ({result['module']})")
        ref, cur = outputs["baseline"], outputs["current"]
        rel = float((cur - ref).norm() / ref.norm())
        print(f"current vs baseline output: relative L2 error {rel:.2e}, max abs {float((cur - ref).abs().max()):.2e}")


if __name__ == "__main__":
    main()
