"""Artifacts: save/load round trip (in a fresh process), no recompilation on load, integrity and
compatibility checks, input signature checks, atomic saves."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kiln
from kiln.aot import compile_ahead
from kiln.runtime import ArtifactError, CompiledGraph, InputError, load, save
from kiln.runtime import artifact as artifact_mod

from .factories import make

CPU = kiln.Options(target="cpu")


@pytest.fixture(scope="module")
def compiled():
    model, inputs = make()
    c, report = compile_ahead(model, inputs, CPU)
    return c


@pytest.fixture
def art(compiled, tmp_path):
    return save(compiled, tmp_path / "art", signature_note="test")


def eager():
    model, inputs = make()
    with torch.no_grad():
        return inputs, model(*inputs)


def one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_layout(art, compiled):
    assert sorted(os.listdir(art)) == ["graph.json", "kernels.json", "manifest.json", "weights.safetensors"]
    m = json.load(open(os.path.join(art, "manifest.json")))
    assert m["format"] == "kiln.artifact" and m["target"] == "cpu" and m["device"] == "cpu"
    assert m["kiln_version"] == kiln.__version__ and m["torch_version"] == torch.__version__
    assert m["python_version"].count(".") == 2 and "triton_version" in m
    assert [(i["shape"], i["dtype"]) for i in m["inputs"]] == [([4, 16], "float32"), ([4, 1], "float32")]
    assert m["num_outputs"] == 2 and m["note"] == "test"
    assert set(m["files"]) == {"graph.json", "kernels.json", "weights.safetensors"}
    kj = json.load(open(os.path.join(art, "kernels.json")))["kernels"]
    assert set(kj) == set(compiled.kernels)
    assert all(k["source"] for k in kj.values())


def test_round_trip_in_process_without_recompiling(art, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("load must not capture, run passes or generate code")
    import kiln.api
    import kiln.codegen
    import kiln.ir.capture
    import kiln.passes.pipeline
    for mod, name in [(kiln.api, "run_pipeline"), (kiln.passes.pipeline, "run_pipeline"),
                      (kiln.api, "generate"), (kiln.codegen, "generate"), (kiln.ir.capture, "capture_export"),
                      (kiln.ir.capture, "from_fx")]:
        monkeypatch.setattr(mod, name, boom)
    c = load(art)
    assert isinstance(c, CompiledGraph) and c.check_inputs
    inputs, want = eager()
    got = c(*inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_round_trip_fresh_process(art, tmp_path):
    inputs, want = eager()
    torch.save(inputs, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from kiln.runtime import load
        c = load({str(art)!r})
        inputs = torch.load({str(tmp_path / 'in.pt')!r})
        torch.save(tuple(c(*inputs)), {str(tmp_path / 'out.pt')!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_corrupt_weights(art):
    p = os.path.join(art, "weights.safetensors")
    data = bytearray(open(p, "rb").read())
    data[len(data) - 5] ^= 0xFF
    open(p, "wb").write(bytes(data))
    with pytest.raises(ArtifactError) as e:
        load(art)
    assert one_line(e) == "corrupt artifact: weights.safetensors checksum mismatch"


@pytest.mark.parametrize("name", ["graph.json", "kernels.json"])
def test_corrupt_json(art, name):
    with open(os.path.join(art, name), "a") as f:
        f.write("x")
    with pytest.raises(ArtifactError, match=f"corrupt artifact: {name} checksum mismatch") as e:
        load(art)
    one_line(e)


def test_missing_things(art, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist") as e:
        load(tmp_path / "nope")
    one_line(e)
    os.remove(os.path.join(art, "kernels.json"))
    with pytest.raises(ArtifactError, match="kernels.json is missing") as e:
        load(art)
    one_line(e)
    os.remove(os.path.join(art, "manifest.json"))
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load(art)


def _edit_manifest(art, **changes):
    p = os.path.join(art, "manifest.json")
    m = json.load(open(p))
    m.update(changes)
    json.dump(m, open(p, "w"))


def test_bad_manifest_json(art):
    open(os.path.join(art, "manifest.json"), "w").write("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON") as e:
        load(art)
    one_line(e)


def test_incompatible_format_version(art):
    _edit_manifest(art, format_version=99)
    with pytest.raises(ArtifactError, match="incompatible artifact: format version 99") as e:
        load(art)
    one_line(e)


def test_incompatible_kiln_major(art):
    _edit_manifest(art, kiln_version="7.0.0")
    with pytest.raises(ArtifactError, match="kiln 7.0.0") as e:
        load(art)
    one_line(e)
    _edit_manifest(art, kiln_version=kiln.__version__.split(".")[0] + ".999.0")
    load(art)                                # same major: fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("target", ["triton", "cuda"])
def test_gpu_artifact_on_cpu_machine(art, target):
    _edit_manifest(art, target=target, device="cuda")
    with pytest.raises(ArtifactError, match="--target cpu") as e:
        load(art)
    assert "no GPU" in one_line(e)


@pytest.mark.parametrize("bad, match", [
    (lambda x, s: (x,), "expected 2 inputs"),
    (lambda x, s: (x, s, s), "expected 2 inputs"),
    (lambda x, s: (x[:, :8], s), r"input 0: expected float32\[4,16\], got float32\[4,8\]"),
    (lambda x, s: (x.double(), s), r"input 0: expected float32\[4,16\], got float64\[4,16\]"),
    (lambda x, s: (x, 2.0), "input 1: expected a tensor"),
])
def test_wrong_inputs(art, bad, match):
    c = load(art)
    inputs, _ = eager()
    with pytest.raises(InputError, match=match) as e:
        c(*bad(*inputs))
    one_line(e)


def test_compile_ahead_checks_inputs(compiled):
    with pytest.raises(InputError):
        compiled(torch.randn(3, 16), torch.rand(4, 1))


def test_save_replaces_existing_artifact(compiled, art):
    before = json.load(open(os.path.join(art, "manifest.json")))
    save(compiled, art, signature_note="second")
    assert json.load(open(os.path.join(art, "manifest.json")))["note"] == "second"
    assert before["note"] == "test"
    parent = os.path.dirname(art)
    assert os.listdir(parent) == ["art"]          # no temp or old directories left behind
    load(art)


def test_failed_save_leaves_old_artifact(compiled, art, monkeypatch):
    def fail(*a, **k):
        raise OSError("disk full")
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save(compiled, art, signature_note="broken")
    monkeypatch.undo()
    assert json.load(open(os.path.join(art, "manifest.json")))["note"] == "test"
    assert os.listdir(os.path.dirname(art)) == ["art"]
    load(art)


def test_failed_first_save_leaves_nothing(compiled, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_mod, "_manifest", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save(compiled, tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_refuses_to_clobber_other_directory(compiled, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a kiln artifact"):
        save(compiled, d)
    assert (d / "notes.txt").read_text() == "precious"


def test_strided_constants_keep_layout(compiled, art):
    c = load(art)
    for v in c.graph.constant_values:
        t = c.graph.constants[v.name]
        if isinstance(t, torch.Tensor):
            assert tuple(t.stride()) == tuple(v.type.strides), v.name
            torch.testing.assert_close(t, compiled.graph.constants[v.name])
