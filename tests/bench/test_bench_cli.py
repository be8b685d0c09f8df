"""`kiln bench`: the CPU mode runs end to end and writes valid JSON and markdown; the chart
renders a PNG from a results JSON; bad requests are one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def kiln(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_line_error(r, needle):
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: ") and needle in lines[0], r.stderr


def test_cpu_tiny_writes_json_and_markdown(tmp_path):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    r = kiln("bench", "--cpu", "--cases", "tiny", "--json", str(js), "--markdown", str(md))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert {"device", "torch", "triton", "copy_bandwidth_GBps", "matmul_peak_TFLOPs", "command"} <= set(res["meta"])
    assert res["meta"]["command"].startswith("kiln bench --cpu")
    assert [row["case"] for row in res["rows"]] == ["softmax", "bias_gelu_residual"]
    for row in res["rows"]:
        for b in ("eager", "inductor", "kiln"):
            assert row[f"{b}_ms"] > 0, row
        assert row["kiln_ok"] and row["kiln_rel_err"] < 1e-4
        assert row["roofline_ms"] > 0 and row["bound"] in ("memory", "compute") and row["bytes"] > 0
        assert row["kiln"]["kernels"] >= 1
    assert res["geomean"]["micro"]["cases"] == 2 and res["geomean"]["micro"]["kiln"] > 0
    text = md.read_text()
    assert "| case | eager ms | Inductor ms | kiln ms |" in text and "Geometric-mean speed-up" in text
    assert text.count("(small, CPU)") == 2


def test_bad_requests_are_one_line_errors():
    one_line_error(kiln("bench", "--cpu", "--cases", "nope"), "unknown bench case 'nope'")
    if not torch.cuda.is_available():
        one_line_error(kiln("bench", "--cases", "softmax"), "use --cpu")


def test_help():
    r = kiln("bench", "--help")
    assert r.returncode == 0 and "--cases" in r.stdout and "--chart" in r.stdout and "--cpu" in r.stdout


def test_case_groups():
    import cases
    assert cases.resolve(["model"], "all") == ["llama_layer", "gpt2_block", "bert_layer", "swiglu_mlp",
                                                  "llama_decode"]
    assert cases.resolve(["softmax,micro"], "all")[0] == "softmax" and len(cases.resolve(["all"], "x")) == 9


SAMPLE = {
    "meta": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "kiln_autotune": False},
    "rows": [
        {"case": "softmax", "group": "micro", "eager_ms": 0.137, "inductor_ms": 0.083, "kiln_ms": 0.050,
         "roofline_ms": 0.045},
        {"case": "llama_layer", "group": "model", "eager_ms": 5.0, "inductor_ms": 4.1, "kiln_error": "boom",
         "roofline_ms": 2.5},
    ],
    "geomean": {"micro": {"inductor": 1.65, "kiln": 2.74, "cases": 1}},
}


def test_chart_renders_png(tmp_path):
    pytest.importorskip("matplotlib")
    from chart import main, render
    out = render(SAMPLE, str(tmp_path / "c.png"))
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    (tmp_path / "s.json").write_text(json.dumps(SAMPLE))
    assert main([str(tmp_path / "s.json"), str(tmp_path / "d.png")]) == 0 and (tmp_path / "d.png").exists()
