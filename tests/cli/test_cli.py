"""The ``mossformer2`` dispatcher: every subcommand is present and user errors become one-line messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mossformer2.cli import SUBCOMMANDS, build_parser, main
from tests.conftest import torch_blocked_env


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "separate" in capsys.readouterr().out


def test_user_error_is_one_line_with_exit_code_1(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert main(["info", "--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mossformer2 info: error:") and "Traceback" not in err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mossformer2", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("mossformer2 ")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: mossformer2" in capsys.readouterr().out


def run_info_with(run_body: str) -> str:
    """Run `mossformer2 info` in a fresh interpreter with its ``run`` replaced by ``def run(args):`` + ``run_body``
    (indented lines); then warn once outside the command. Returns stderr."""
    script = ("import sys, warnings, mossformer2.cli.info as info\n"
              "from tqdm import tqdm\n"
              "from mossformer2.cli import main\n"
              f"def run(args):\n{run_body}"
              "info.run = run\n"
              "main(['info'])\n"
              "warnings.warn('after the command')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_warnings_are_one_line_messages_and_the_format_is_restored():
    """A command's warnings read `mossformer2 CMD: warning: ...`, without source path and code line."""
    stderr = run_info_with("    warnings.warn('outputs over full scale')\n")
    lines = stderr.splitlines()
    assert lines[0] == "mossformer2 info: warning: outputs over full scale"
    assert "UserWarning: after the command" in stderr  # Python's own format again outside the command


def test_a_warning_during_a_progress_bar_gets_its_own_line():
    stderr = run_info_with("    with tqdm(total=2, file=sys.stderr, desc='separating') as bar:\n"
                           "        bar.update(1)\n"
                           "        warnings.warn('outputs over full scale')\n"
                           "        bar.update(1)\n")
    (line,) = [line for line in stderr.split("\n") if "warning:" in line]
    assert line.split("\r")[-1].strip() == "mossformer2 info: warning: outputs over full scale", repr(line)


def test_demo_refuses_bad_requests_before_separating(tmp_path, capsys):
    """A file where the output folder should be, a non-finite SIR, a model with other than two speakers: one
    line each, before the separation (they were an errno after it, "audio contains NaN", a scoring error)."""
    from mossformer2 import build_model, save_checkpoint
    from tests.conftest import make_tiny_config

    taken = tmp_path / "taken"
    taken.write_text("a file")
    save_checkpoint(tmp_path / "three.pt", build_model(make_tiny_config(num_spks=3)))
    for args, reason in [(["-o", str(taken)], "it is a file, not a folder"),
                         (["-o", str(tmp_path / "a"), "--sir", "nan"], "(--sir) must be a number of dB from -60 to 60"),
                         # as `mix` refuses it: reference 2 was written silent and scored -80 dB
                         (["-o", str(tmp_path / "a"), "--sir", "400"], "(--sir) must be a number of dB from -60"),
                         (["-o", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "three.pt")], "separates 3")]:
        assert main(["demo", "--device", "cpu", *args]) == 1
        err = capsys.readouterr().err
        assert "mossformer2 demo: error:" in err and reason in err, err
    assert not (tmp_path / "b").exists()  # nothing written, no folder created


def test_an_output_path_under_a_file_is_named_before_any_work(tmp_path, capsys):
    """`os.mkdir` only says "[Errno 17] File exists: 'taken'"; export said so after loading the checkpoint."""
    from tests.evaluation.test_mix import make_speaker_folder

    taken = tmp_path / "taken"
    taken.write_text("a file")
    speakers = make_speaker_folder(tmp_path / "speakers", speakers=2, files=1)
    assert main(["mix", str(speakers), "-o", str(tmp_path / "mixed"), "--num-mixtures", "1"]) == 0
    missing = str(tmp_path / "never_loaded.pt")
    for command in (["export", "--checkpoint", missing, "--format", "torchscript", "-o", str(taken / "m.ts.pt")],
                    ["mix", str(speakers), "-o", str(taken / "mixtures"), "--num-mixtures", "1"],
                    ["evaluate", "--data", str(tmp_path / "mixed"), "--checkpoint", missing, "--out",
                     str(taken / "scores")]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert str(taken) in err and "is a file, not a folder" in err, err
        assert "Errno" not in err and "never_loaded" not in err, err
    assert taken.read_text() == "a file"


def test_train_overrides_may_sit_on_both_sides_of_an_option(monkeypatch):
    import mossformer2.cli.train as train_cli

    seen = []
    monkeypatch.setattr(train_cli, "run", lambda args: seen.append(args.overrides) or 0)
    assert main(["train", "--config", "c.yaml", "a.x=1", "--exp-dir", "d", "b.y=2", "a.x=3"]) == 0
    assert seen == [["a.x=1", "b.y=2", "a.x=3"]]  # all of them, in the given order (the last a.x wins)
    with pytest.raises(SystemExit):  # anything else left over is still refused
        main(["train", "--config", "c.yaml", "a.x=1", "--exp-dir", "d", "stray"])


def test_a_closed_pipe_ends_quietly_and_a_missing_package_is_one_line(monkeypatch, capsys):
    import mossformer2.cli.info as info_cli

    def broken_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(info_cli, "run", broken_pipe)
    assert main(["info"]) == 141  # `mossformer2 info | head`: no "error: [Errno 32] Broken pipe"
    assert capsys.readouterr().err == ""

    def missing(args):
        raise ModuleNotFoundError("No module named 'pesq'", name="pesq")

    monkeypatch.setattr(info_cli, "run", missing)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mossformer2 info: error: No module named 'pesq'") and "pip install pesq" in err

    def no_yaml(args):  # the import name is not what pip installs
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    monkeypatch.setattr(info_cli, "run", no_yaml)
    assert main(["info"]) == 1
    assert "install it with `pip install pyyaml`" in capsys.readouterr().err

    def ours(args):
        raise ModuleNotFoundError("No module named 'mossformer2.nothing'", name="mossformer2.nothing")

    monkeypatch.setattr(info_cli, "run", ours)
    with pytest.raises(ModuleNotFoundError):  # a missing module of our own is a bug: the traceback shows
        main(["info"])


def test_without_matplotlib_demo_stops_before_writing_and_says_once_what_to_install(tmp_path, capsys, monkeypatch):
    """The demo wrote its audio and then failed on the plot; the hint was printed twice."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert main(["demo", "-o", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("pip install matplotlib") == 1 and "spectrogram plots need matplotlib" in err
    assert not list(tmp_path.rglob("*.wav"))


def test_commands_that_need_torch_say_so_in_one_line_without_it(tmp_path):
    """An ONNX-only install (README, "Export and deployment"): torch made unimportable as if not installed."""
    wav = tmp_path / "x.wav"
    wav.write_bytes(b"")  # never read: the model comes first
    (tmp_path / "m.ts.pt").write_bytes(b"PK")  # a checkpoint file (a missing one is said to be missing first)
    commands = [["separate", str(wav), "-o", str(tmp_path / "o")],
                ["separate", str(wav), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "m.ts.pt")],
                ["info"], ["demo", "-o", str(tmp_path / "d")], ["export", "--format", "onnx", "-o", "m.onnx"]]
    script = (f"import sys\nfrom mossformer2.cli import main\ncodes = [main(a) for a in {commands!r}]\n"
              "print(codes, 'torch' in sys.modules)\n")
    env = torch_blocked_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert out.stdout.split() == ["[1,", "1,", "1,", "1,", "1]", "False"], out.stderr
    errors = [line for line in out.stderr.splitlines() if not line.startswith("using the built-in model")]
    onnx_hint = ("error: PyTorch is not installed: the built-in model and .pt checkpoints need it; pass "
                 "--checkpoint MODEL.onnx (README, \"Export and deployment\")")
    assert errors == [f"mossformer2 separate: {onnx_hint}", f"mossformer2 separate: {onnx_hint}",
                      f"mossformer2 info: {onnx_hint}",
                      "mossformer2 demo: error: PyTorch is not installed, and `mossformer2 demo` needs it here: "
                      "pip install torch",
                      "mossformer2 export: error: PyTorch is not installed, and `mossformer2 export` needs it "
                      "here: pip install torch"], out.stderr


def test_spelled_out_choices_and_defaults_are_the_librarys():
    """The parsers spell out choices the library defines (importing numpy / scipy / torch when the parser is built
    would slow `mossformer2 --help` down): they must not drift apart (separate's own are checked in
    test_cli_separate)."""
    import argparse

    from mossformer2.audio import WRITE_SUBTYPES
    from mossformer2.cli import build_parser
    from mossformer2.export import TORCHSCRIPT_METHODS
    from mossformer2.metrics import METRICS
    from mossformer2.separation.separator import CHUNK_SECONDS, NORMALIZE, OVERLAP_SECONDS, STITCHING
    from mossformer2.utils import _DTYPES

    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]

    def options(command):
        return {a.dest: a for a in subcommands.choices[command]._actions}

    for command in ("separate", "evaluate"):
        found = options(command)
        assert tuple(found["stitching"].choices) == STITCHING and tuple(found["normalize"].choices) == NORMALIZE
        assert found["overlap_seconds"].default == OVERLAP_SECONDS  # and the defaults too
        assert set(found["dtype"].choices) == set(_DTYPES.values())  # every precision, by its canonical name
    assert options("separate")["chunk_seconds"].default == CHUNK_SECONDS
    assert tuple(options("export")["method"].choices) == TORCHSCRIPT_METHODS
    assert tuple(options("mix")["subtype"].choices) == WRITE_SUBTYPES
    assert options("evaluate")["metrics"].default is None  # every installed metric (metrics.installed_metrics)
    assert ",".join(METRICS) in options("evaluate")["metrics"].help
