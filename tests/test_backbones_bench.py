"""pipeline/backbones/bench.py: `transfer backbones --bench` times the network extract would run."""

from __future__ import annotations

import pytest

import pipeline
from pipeline.errors import SettingError
from tests.conftest import assert_one_line_error, run_cli


def test_bench_times_each_backbone_at_the_chosen_precision():
    results = pipeline.bench_backbones(["timm:test_vit", "timm:test_convnext"], precision="fp32", batch_size=2,
                                       seconds=0.2, progress=False)
    assert [r.name for r in results] == ["timm:test_vit.r160_in1k", "timm:test_convnext.r160_in1k"]
    for r in results:
        assert r.device == "cpu" and r.precision == "fp32" and r.batch_size == 2 and r.crop == 160
        assert r.batches >= 2 and r.seconds >= 0.2
        assert r.images_per_second == pytest.approx(r.batches * 2 / r.seconds)
    with pytest.raises(SettingError, match="precision"):
        pipeline.bench_backbones(["timm:test_vit"], precision="int8")


def test_bench_command_prints_one_line_per_backbone_and_needs_names():
    result = run_cli("backbones", "--bench", "timm:test_vit", "--batch-size", "2", "--seconds", "0.1",
                     "--precision", "bf16")
    assert result.code == 0, result.err
    line, = result.out.splitlines()
    assert line.startswith("timm:test_vit.r160_in1k") and " img/s  (cpu, bf16, batch 2, 160px, " in line
    assert "the network alone" in result.err
    assert_one_line_error(run_cli("backbones", "--bench"), "--bench needs the backbones to time")
    assert_one_line_error(run_cli("backbones", "resnet18"), "NAME (resnet18) is for --bench")
