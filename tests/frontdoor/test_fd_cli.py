"""The kiln CLI: compile/run/explain/demo through the installed ``kiln`` script (subprocess),
one-line errors without tracebacks, --help on every subcommand."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kiln.cli import main

from .factories import make

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = os.path.join(HERE, "factories.py") + ":make"
SUBCOMMANDS = ["compile", "run", "explain", "demo"]


def kiln_cmd() -> list[str]:
    exe = shutil.which("kiln")
    if exe and os.path.dirname(exe) == os.path.dirname(sys.executable):
        return [exe]
    return [sys.executable, "-m", "kiln.cli"]


def kiln(*args, timeout=300):
    return subprocess.run(kiln_cmd() + list(args), capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r, needle=None):
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kiln: error: "), lines[0]
    if needle:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "art"
    report = d.parent / "report.jsonl"
    r = kiln("compile", SPEC, "-o", str(d), "--target", "cpu", "--report", str(report))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout and r.stderr.strip() == "", r.stderr
    assert len(report.read_text().splitlines()) == 1
    return d


def test_compile_then_run_matches_eager(artifact, tmp_path):
    model, inputs = make()
    with torch.no_grad():
        want = model(*inputs)
    torch.save(inputs, tmp_path / "in.pt")
    r = kiln("run", str(artifact), "--inputs", str(tmp_path / "in.pt"), "--output", str(tmp_path / "out.pt"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert isinstance(got, tuple) and len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_run_wrong_inputs_one_line(artifact, tmp_path):
    torch.save((torch.randn(4, 15), torch.rand(4, 1)), tmp_path / "bad.pt")
    r = kiln("run", str(artifact), "--inputs", str(tmp_path / "bad.pt"), "--output", str(tmp_path / "o.pt"))
    assert_one_line_error(r, "input 0: expected float32[4,16]")
    assert not (tmp_path / "o.pt").exists()


def test_run_corrupt_artifact_one_line(artifact, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    p = broken / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    torch.save(make()[1], tmp_path / "in.pt")
    code = main(["run", str(broken), "--inputs", str(tmp_path / "in.pt"), "--output", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == "kiln: error: corrupt artifact: weights.safetensors checksum mismatch"


def test_bad_spec_subprocess_no_traceback(tmp_path):
    r = kiln("compile", "no_colon_here", "-o", str(tmp_path / "x"))
    assert_one_line_error(r, "expected 'path/to/file.py:factory'")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("spec, needle", [
    ("missing/file.py:make", "not found"),
    (os.path.join(HERE, "factories.py") + ":nope", "has no attribute 'nope'"),
    (os.path.join(HERE, "factories.py") + ":make_three", "must return (model, example_inputs)"),
    (os.path.join(HERE, "factories.py") + ":make_raises", "factory exploded"),
    (os.path.join(HERE, "factories.py") + ":not_callable", "not callable"),
    ("no_such_package_xyz.models:make", "no module named"),
    ("kiln.demo:nothing_here", "has no attribute"),
    # an artifact would drop these writes: every call would give eager's first answer
    (os.path.join(HERE, "factories.py") + ":make_counter", "forward writes buffer 'n' in place"),
    (os.path.join(HERE, "factories.py") + ":make_adds_to_input", "forward writes its input 0 in place"),
])
def test_bad_specs(spec, needle, tmp_path, capsys):
    code = main(["compile", spec, "-o", str(tmp_path / "x"), "--target", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("kiln: error: ") and needle in err, err
    assert not (tmp_path / "x").exists()


def test_debug_shows_traceback(tmp_path):
    r = kiln("--debug", "compile", "missing/file.py:make", "-o", str(tmp_path / "x"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_artifact_and_inputs(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none"), "--inputs", "a.pt", "--output", "b.pt"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bad_option_value_is_usage_error(capsys):
    assert main(["compile", SPEC, "-o", "x", "--target", "tpu"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bad_memory_budget_one_line(tmp_path, capsys):
    assert main(["compile", SPEC, "-o", str(tmp_path / "x"), "--memory-budget", "lots"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: error: memory_budget") and "\n" not in err


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_each_subcommand(sub, capsys):
    assert main([sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kiln {sub}")


def test_help_top_level_subprocess():
    r = kiln("--help")
    assert r.returncode == 0
    for sub in SUBCOMMANDS:
        assert sub in r.stdout


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2


def test_explain_artifact_sections(artifact, capsys):
    assert main(["explain", str(artifact)]) == 0
    out = capsys.readouterr().out
    for head in ("== IR after passes ==", "== fusion groups", "== memory plan ==", "== kernels"):
        assert head in out
    assert "graph(" in out
    assert main(["explain", str(artifact), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "== memory plan ==" in out and "== IR after passes ==" not in out and "== kernels" not in out


def test_explain_spec(capsys):
    assert main(["explain", SPEC, "--target", "cpu", "--groups", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "== fusion groups" in out and "== kernels" in out and "== memory plan" not in out


def test_demo_small():
    r = kiln("demo", "--small", "--steps", "2", "--target", "cpu", timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "check vs eager" in r.stdout and "speed-up" in r.stdout and "compile:" in r.stdout
