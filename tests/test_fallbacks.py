"""An optimisation that does not apply on this machine (a recipe's AMP mode without the hardware for it) falls back
to what does, with one WARNING line saying which and why, never a traceback (issue 11 "Bad input")."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from rclip_cli.main import cli
from rclip_core import engine


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("what", ["inference", "training"])
def test_fp16_without_cuda_falls_back_to_fp32_with_one_warning(caplog, what):
    with caplog.at_level(logging.WARNING):
        assert engine.resolve_amp("fp16", "cpu", what=what) == "off"
    (line,) = _warnings(caplog)
    assert "fp16" in line and "CUDA" in line and what in line and "fp32" in line


def test_bf16_on_a_cpu_without_it_falls_back_and_with_it_applies(caplog, monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert engine.resolve_amp("bf16", "cpu", what="inference") == "off"
    (line,) = _warnings(caplog)
    assert "bf16" in line and "bfloat16" in line and "fp32" in line
    caplog.clear()
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    with caplog.at_level(logging.WARNING):
        assert engine.resolve_amp("bf16", "cpu") == "bf16"
        assert engine.resolve_amp("off", "cpu") == "off"
    assert _warnings(caplog) == []


def test_bf16_on_a_gpu_without_it_falls_back(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level(logging.WARNING):
        assert engine.resolve_amp("bf16", "cuda:0") == "off"
    (line,) = _warnings(caplog)
    assert "bf16" in line and "GPU" in line


def test_zeroshot_with_fp16_on_the_cpu_runs_in_fp32_and_says_so_once(small_coco, monkeypatch):
    """The whole command: exit 0, the same detections as without the option, one WARNING line, no traceback."""
    runner = CliRunner()
    emb = small_coco["dir"] / "classes.pt"
    res = runner.invoke(cli, ["embed", "--classes-from", str(small_coco["ann"]), "--out", str(emb), "--variant",
                              "tiny"])
    assert res.exit_code == 0, res.output
    outs = {}
    for amp in ("off", "fp16"):
        out = small_coco["dir"] / f"dets_{amp}.json"
        res = runner.invoke(cli, ["--device", "cpu", "zeroshot", "--gt-boxes", str(small_coco["ann"]), "--images",
                                  str(small_coco["images"]), "--embeddings", str(emb), "--out", str(out), "--variant",
                                  "tiny", "--set", "input.min_size=96", "--set", f"zeroshot.amp={amp}"])
        assert res.exit_code == 0, res.output
        assert "Traceback" not in res.output
        outs[amp] = (res.output, out.read_text())
    assert outs["fp16"][1] == outs["off"][1]
    amp_lines = [ln for ln in outs["fp16"][0].splitlines() if "amp " in ln]
    assert len(amp_lines) == 1 and "fp16" in amp_lines[0] and "CUDA" in amp_lines[0] and "WARNING" in amp_lines[0]
    assert not [ln for ln in outs["off"][0].splitlines() if "amp " in ln]


def test_amp_off_can_be_set_although_yaml_reads_off_as_false():
    from rclip_core.recipes import load_recipe

    r = load_recipe(None, ["zeroshot.amp=off", "pretrain.amp=off"])
    assert r.zeroshot.amp == "off" and r.pretrain.amp == "off"


def test_torch_compile_that_fails_falls_back_to_eager_with_one_warning(small_coco, monkeypatch, caplog):
    """``zeroshot.compile`` where torch.compile cannot work (simulated: no C++ compiler; it fails on the first
    call): the same detections as without it, one WARNING line per compiled part, no traceback."""
    runner = CliRunner()
    emb = small_coco["dir"] / "classes.pt"
    res = runner.invoke(cli, ["embed", "--classes-from", str(small_coco["ann"]), "--out", str(emb), "--variant",
                              "tiny"])
    assert res.exit_code == 0, res.output

    def no_compiler(module, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nno C++ compiler found (g++)")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    outs = {}
    for flag in ("false", "true"):
        out = small_coco["dir"] / f"dets_{flag}.json"
        res = runner.invoke(cli, ["--device", "cpu", "zeroshot", "--gt-boxes", str(small_coco["ann"]), "--images",
                                  str(small_coco["images"]), "--embeddings", str(emb), "--out", str(out),
                                  "--variant", "tiny", "--set", "input.min_size=96", "--set",
                                  "zeroshot.score_thresh=0", "--set", f"zeroshot.compile={flag}"])
        assert res.exit_code == 0, res.output
        assert "Traceback" not in res.output
        outs[flag] = (" ".join(res.output.split()), out.read_text())  # rich wraps long lines
    assert outs["true"][1] == outs["false"][1]
    assert len(json.loads(outs["true"][1])) == 12  # 3 images × 2 boxes × 2 classes
    said = outs["true"][0]
    assert said.count("WARNING torch.compile failed") == 2 and said.count("torch.compile") == 2, said
    assert "the trunk (no C++ compiler found (g++)): running it in eager mode" in said
    assert "res5 (no C++ compiler found (g++)): running it in eager mode" in said
    assert "torch.compile" not in outs["false"][0]


def test_a_bad_input_under_compile_still_raises_its_own_error():
    """The eager fallback decides: an error of the input itself is raised, not swallowed as a compile failure."""
    from rclip_core.inference import CompiledOrEager

    part = CompiledOrEager(torch.nn.Linear(3, 2), "a layer")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        part(torch.zeros(1, 5))
