"""The benchmark scripts that need hardware this machine may lack say so and exit 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_sd_throughput_without_a_gpu_says_so(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("sd_throughput", BENCHMARKS / "sd_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["sd_throughput.py"])
    assert module.main() == 0
    assert "no CUDA GPU here" in capsys.readouterr().out


def test_speed_without_onnxruntime_says_so(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("speed", BENCHMARKS / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    module.onnx_table(None, rounds=1)
    assert "onnxruntime table skipped: onnxruntime not installed" in capsys.readouterr().out
    assert module.cpu_flags()  # the CPU's model and vector flags, or why not
