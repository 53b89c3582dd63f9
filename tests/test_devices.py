"""pipeline/devices.py: what `--precision auto` resolves to, and the CPU batch probe and its memory."""

from __future__ import annotations

import json
import os
import time
import types

import numpy as np
import pytest
import torch

from pipeline import devices, extract, read_cache
from pipeline.errors import TransferError
from tests.conftest import Stop, StopAfterFirstBatch, make_folder

BF16_CPU = {"avx512_f": True, "avx512_bf16": True, "amx_bf16": False, "cpu_name": "Test CPU"}
PLAIN_CPU = {"avx512_f": True, "avx2": True, "avx512_bf16": False, "amx_bf16": False, "cpu_name": "Test CPU"}


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "user-cache"))


def test_auto_is_bf16_exactly_when_the_cpu_computes_bf16_natively(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "onednn_bf16_missing", lambda: "")  # as on a CPU whose oneDNN has bf16
    monkeypatch.setattr(devices, "cpu_capabilities", lambda: dict(BF16_CPU))
    choice = devices.resolve_precision("auto", cpu)
    assert choice.value == "bf16" and "avx512_bf16" in choice.why
    assert devices.resolve_precision(None, cpu).value == "bf16"
    monkeypatch.setattr(devices, "cpu_capabilities", lambda: dict(PLAIN_CPU))
    choice = devices.resolve_precision("auto", cpu)
    assert choice.value == "fp32" and "no native bf16" in choice.why
    monkeypatch.setattr(devices, "cpu_capabilities", lambda: {"architecture": "arm64", "bf16": True})
    assert devices.resolve_precision("auto", cpu).value == "bf16"
    monkeypatch.setattr(devices, "onednn_bf16_missing", lambda: "oneDNN does not report bf16 support")
    choice = devices.resolve_precision("auto", cpu)
    assert choice.value == "fp32" and "oneDNN does not report bf16" in choice.why


def test_auto_needs_onednn_bf16_as_well(monkeypatch):
    monkeypatch.setattr(devices, "cpu_capabilities", lambda: dict(BF16_CPU))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    choice = devices.resolve_precision("auto", torch.device("cpu"))
    assert choice.value == "fp32" and "no oneDNN" in choice.why


def test_auto_is_bf16_on_cuda_and_an_asked_or_earlier_precision_wins(monkeypatch):
    monkeypatch.setattr(devices, "cpu_capabilities", lambda: dict(PLAIN_CPU))
    assert devices.resolve_precision("auto", torch.device("cuda")).value == "bf16"
    assert devices.resolve_precision("fp16", torch.device("cpu")) == devices.Choice("fp16", "asked for")
    kept = devices.resolve_precision("auto", torch.device("cpu"), earlier="bf16")
    assert kept.value == "bf16" and "earlier run" in kept.why


def test_the_real_capability_query_answers(monkeypatch):
    native, why = devices.cpu_bf16()
    assert isinstance(native, bool) and why
    older = types.SimpleNamespace(_is_avx512_bf16_supported=lambda: True, _is_amx_tile_supported=lambda: False)
    monkeypatch.setattr(torch, "cpu", older)  # torch < 2.8: no get_capabilities, two older queries
    assert devices.cpu_capabilities() == {"avx512_bf16": True, "amx_bf16": False}


@pytest.mark.parametrize("capabilities, expected", [(BF16_CPU, "bf16"), (PLAIN_CPU, "fp32")])
def test_extract_records_and_reports_what_auto_chose(tmp_path, monkeypatch, capabilities, expected):
    monkeypatch.setattr(devices, "cpu_capabilities", lambda: dict(capabilities))
    monkeypatch.setattr(devices, "onednn_bf16_missing", lambda: "")
    images = make_folder(tmp_path / "images", {"a": 2, "b": 1})
    seen = []
    summary = extract(images, tmp_path / "c.h5", backbone="efficientnet_lite0", weights="random", device="cpu",
                      on_ready=seen.append)
    cached = read_cache(summary.out)
    assert summary.precision == seen[0].precision.value == cached.provenance["precision"] == expected
    assert cached.provenance["precision_choice"] == seen[0].precision.why
    assert cached.provenance["precision_choice"].startswith("auto: ")


# --- the batch probe ---------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """The probe's clock, advanced only by the fake networks below: timings exact, tests instant."""
    now = [0.0]
    monkeypatch.setattr(devices, "time", types.SimpleNamespace(perf_counter=lambda: now[0], strftime=time.strftime))
    return now


@pytest.fixture
def fake_network(clock):
    def make(per_image: dict[int, float], calls: list):
        """forward(n) that takes per_image[n] seconds per image."""

        def forward(n):
            calls.append(n)
            clock[0] += n * per_image[n]

        return forward

    return make


def test_the_probe_picks_the_fastest_batch_and_prefers_smaller_ones_on_ties(fake_network):
    calls = []
    probe = devices.probe_batch_size(fake_network({4: 0.004, 8: 0.002, 16: 0.003, 32: 0.004}, calls), budget=60)
    assert probe.best == 8 and set(probe.rates) == {4, 8, 16, 32}
    assert calls == [4, 8, 16, 32] + [4, 8, 16, 32] + [32, 16, 8, 4]  # warm-ups, then two alternating rounds
    near = devices.probe_batch_size(fake_network({4: 0.00308, 8: 0.0031, 16: 0.003, 32: 0.0035}, []), budget=60)
    assert near.best == 4  # within 3% of the fastest (16): the smallest such batch


def test_the_probe_stops_growing_the_batch_when_its_budget_is_spent(fake_network):
    calls = []
    probe = devices.probe_batch_size(fake_network({4: 0.01, 8: 0.01, 16: 0.01, 32: 0.01}, calls), budget=0.5)
    # with 8 the probe ends at 0.36 s (<= 0.5), with 16 it would end at 0.84 s: 16 and 32 are left out
    assert set(probe.rates) == {4, 8} and calls == [4, 8, 4, 8, 8, 4]


def test_the_batch_is_probed_once_per_machine_and_network_then_remembered(tmp_path, fake_network):
    cpu = torch.device("cpu")
    calls = []
    forward = fake_network({4: 0.003, 8: 0.001, 16: 0.002, 32: 0.002}, calls)
    first = devices.choose_batch_size(None, cpu, "netA; bf16", 1000, forward)
    assert first.value == 8 and first.why.startswith("probed") and calls
    memory = json.loads((tmp_path / "user-cache" / devices.BATCH_MEMORY_FILE).read_text())
    (key, entry), = memory.items()
    assert key.endswith("netA; bf16") and devices.machine_key() in key and entry["batch_size"] == 8
    calls.clear()
    again = devices.choose_batch_size(None, cpu, "netA; bf16", 1000, forward)
    assert again.value == 8 and "probed earlier" in again.why and calls == []
    other = devices.choose_batch_size(None, cpu, "netA; fp32", 1000, forward)  # another precision: its own probe
    assert other.why.startswith("probed") and calls


def test_no_probe_when_the_batch_is_given_or_kept_or_the_run_is_short_or_on_a_gpu(fake_network):
    calls = []
    forward = fake_network({n: 0.001 for n in devices.CPU_BATCH_CANDIDATES}, calls)
    cpu = torch.device("cpu")
    assert devices.choose_batch_size(5, cpu, "n", 10_000, forward) == devices.Choice(5, "asked for")
    assert devices.choose_batch_size(None, cpu, "n", 10_000, forward, earlier=3).value == 3
    short = devices.choose_batch_size(None, cpu, "n", 10, forward)
    assert short.value == devices.CPU_BATCH_DEFAULT and "not probed" in short.why
    assert devices.choose_batch_size(None, cpu, "n", 10_000, forward, probe_allowed=False).value == devices.CPU_BATCH_DEFAULT
    assert devices.choose_batch_size(None, torch.device("cuda"), "n", 10_000, forward).value == devices.GPU_BATCH_DEFAULT
    assert calls == []


def test_an_unwritable_cache_folder_still_probes_and_says_so(tmp_path, monkeypatch, fake_network):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(blocker / "sub"))
    choice = devices.choose_batch_size(None, torch.device("cpu"), "n", 1000,
                                       fake_network({n: 0.001 for n in devices.CPU_BATCH_CANDIDATES}, []))
    assert "not remembered" in choice.why and not os.path.exists(blocker / "sub")


def test_a_resume_keeps_the_batch_size_it_started_with(tmp_path, monkeypatch):
    """A resume redoes whole batches at the same boundaries, so its features equal an uninterrupted
    run's bit for bit - in bf16 too - even when the probe would now choose another batch size."""
    images = make_folder(tmp_path / "images", {"a": 4, "b": 3})
    options = dict(backbone="efficientnet_lite0", weights="random", device="cpu", workers=0)

    with pytest.raises(Stop):
        extract(images, tmp_path / "c.h5", batch_size=3, progress=StopAfterFirstBatch(), **options)
    monkeypatch.setattr(devices, "PROBE_MIN_IMAGES", 1)  # the probe would run now, and pick something else
    monkeypatch.setattr(devices, "probe_batch_size", lambda forward: devices.Probe(4, {4: 1.0}, 0.0))
    resumed = extract(images, tmp_path / "c.h5", **options)
    assert resumed.batch_size == 3 and resumed.resumed_from == 3
    assert "kept from the earlier run" in read_cache(resumed.out).provenance["batch_choice"]
    whole = extract(images, tmp_path / "whole.h5", batch_size=3, **options)
    assert np.array_equal(read_cache(resumed.out).features(), read_cache(whole.out).features())


def test_cuda_requested_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TransferError, match="no CUDA GPU"):
        devices.resolve_device("cuda")
    assert devices.resolve_device("auto").type == "cpu"



def test_under_torchrun_each_rank_gets_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    place = devices.Place(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert str(devices.resolve_device("cuda", place)) == "cuda:1"
    assert str(devices.resolve_device("auto", place)) == "cuda:1"
    assert str(devices.resolve_device("cuda:0", place)) == "cuda:0"  # asked for by number: kept
    assert str(devices.resolve_device("cpu", place)) == "cpu"
    with pytest.raises(TransferError, match="unknown device 'tpu'"):
        devices.resolve_device("tpu", place)


def test_the_place_in_a_job_comes_from_torchruns_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert devices.this_process() == devices.Place() and devices.this_process().leads
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert devices.this_process() == devices.Place(1, 2, 1, 2) and not devices.this_process().leads
    monkeypatch.delenv("RANK")
    with pytest.raises(TransferError, match="RANK is not"):
        devices.this_process()
