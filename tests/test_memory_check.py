"""The memory check of `polyp-ssl train`: a measured estimate, refused before the model is built."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import polyp_ssl.memory as memory
from polyp_ssl.config import TrainConfig
from polyp_ssl.memory import (
    CPU_FIT,
    GIB,
    available_memory_bytes,
    check_before_training,
    estimate_train_bytes,
    memory_verdict,
)
from tests.shard_factory import make_root

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "docs" / "bench" / "train_memory_cpu.json"

# the paper's command (docs/training.md), as a user types it
PAPER = [
    "--num_workers=8", "--max_epochs=50", "--batch_size=60", "--fragment_length=8", "--fragment_stride=4",
    "--fragment_drop_last", "--min_tracklet_length=30", "--im_size=232", "--aug_anchorcrop",
    "--eval_n_views=2", "--eval_batch_size=6", "--eval_fragment_length=8", "--eval_aug_anchorcrop",
    "--encoder_type=hmve", "--sfe_backbone_arch=resnet50", "--sfe_d_model=2048", "--d_proj=128",
    "--hmve_d_model=256", "--hmve_d_feedforward=1024", "--hmve_n_heads=8", "--hmve_n_layers=3",
    "--hmve_dropout=0.1", "--lr=0.00001", "--loss_type=mil-nce", "--loss_temperature=0.07",
    "--loss_milnce_weights", "1.0", "1.0", "--sampler=temporaltemperaturebag", "--sampler_ttb_tmin=0.3",
    "--sampler_ttb_tmax=12", "--n_views=5", "--exp_name=my_experiment",
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("root"), videos={"train": 1, "val": 1})


def _fake_machine(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: (int(gib * GIB), "MemAvailable (test)"))
    monkeypatch.setattr(memory, "_cuda_count", lambda: 0)
    monkeypatch.setattr(memory, "current_rss_bytes", lambda: 0)


def test_the_papers_config_is_refused_on_a_small_machine(root, tmp_path, monkeypatch, capsys):
    from polyp_ssl.train_cli import main

    _fake_machine(monkeypatch, 16)
    runs = tmp_path / "runs"
    argv = ["--dataset_root", str(root), "--runs_dir", str(runs), "--bbox_scale_factor=5", *PAPER]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("polyp-ssl train: error: estimated peak memory ")
    estimate = estimate_train_bytes("resnet50", 232, 60, 8)
    assert f"{estimate / GIB:.1f} GiB in RAM" in err
    assert "--sfe_backbone_arch resnet50 --im_size 232 --batch_size 60 --fragment_length 8" in err
    assert "16.0 GiB available (MemAvailable (test))" in err
    assert "lower --batch_size (to " in err and "--fragment_length or --im_size" in err
    assert "--sfe_backbone_arch resnet18" in err and "--skip_memory_check" in err
    # the batch it suggests does fit, and is a whole number of bags
    batch = int(re.search(r"lower --batch_size \(to (\d+) or less\)", err).group(1))
    assert batch % 5 == 0 and 0 < batch < 60
    assert estimate_train_bytes("resnet50", 232, batch, 8) <= 16 * GIB
    assert estimate_train_bytes("resnet50", 232, batch + 5, 8) > memory.WARN_FRACTION * 16 * GIB
    assert not runs.exists()  # nothing written


def test_the_papers_config_passes_on_a_large_machine_and_skip_flag_skips(root, monkeypatch):
    cfg = TrainConfig.from_dict({"dataset_root": str(root), "accelerator": "cpu"})  # the paper's sizes
    _fake_machine(monkeypatch, 512)
    assert check_before_training(cfg).level == "ok"
    _fake_machine(monkeypatch, 4)
    with pytest.raises(ValueError, match="it would not fit"):
        check_before_training(cfg)
    assert check_before_training(cfg, skip_memory=True) is None
    cfg.trainer.skip_memory_check = True  # the flag, as train() passes it
    assert check_before_training(cfg, skip_memory=cfg.skip_memory_check) is None


def test_near_the_limit_warns(caplog):
    settings = {"sfe_backbone_arch": "resnet18", "im_size": 64, "batch_size": 10, "fragment_length": 4,
                "n_views": 5}  # fmt: skip
    est = estimate_train_bytes("resnet18", 64, 10, 4)
    assert memory_verdict(settings, "cpu", est / 0.9, "test").level == "warn"
    assert memory_verdict(settings, "cpu", est * 2, "test").level == "ok"
    assert memory_verdict(settings, "cpu", est * 0.99, "test").level == "refuse"
    two = memory_verdict(settings, "cpu", est * 1.5, "test", processes=2)
    assert two.level == "refuse" and "x 2 processes" in two.message
    assert memory_verdict(settings, "cpu", None, "").level == "unknown"
    assert memory_verdict({**settings, "sfe_backbone_arch": "resnet152"}, "cpu", 1e12, "").level == "unknown"


def test_estimate_grows_with_every_size_and_backbone():
    base = estimate_train_bytes("resnet18", 128, 20, 8)
    assert estimate_train_bytes("resnet18", 160, 20, 8) > base
    assert estimate_train_bytes("resnet18", 128, 40, 8) > base
    assert estimate_train_bytes("resnet18", 128, 20, 16) > base
    assert estimate_train_bytes("resnet50", 128, 20, 8) > base
    assert estimate_train_bytes("resnet18", 128, 20, -1) is None  # whole tracklets: not fixed
    gpu32 = estimate_train_bytes("resnet50", 232, 60, 8, "cuda", "32")
    gpu16 = estimate_train_bytes("resnet50", 232, 60, 8, "cuda", "bf16-mixed")
    assert gpu16 < gpu32
    assert gpu32 == pytest.approx(memory.CUDA_PAPER_PEAK["32"] + memory.CUDA_CONTEXT_BYTES)


def test_constants_are_the_fit_of_the_measurements():
    bench = json.loads(BENCH.read_text())
    for arch, (a, b) in CPU_FIT.items():
        fit = bench["fit"][arch]
        assert (a, b) == (fit["a_bytes"], fit["b_bytes_per_pixel"])
        assert fit["max_relative_error"] < 0.1
        rows = [r for r in bench["measurements"] if r["arch"] == arch]
        assert len(rows) >= 4
        for r in rows:
            est = estimate_train_bytes(arch, r["im_size"], r["batch_size"], r["fragment_length"])
            assert abs(est - r["peak_rss_bytes"]) / r["peak_rss_bytes"] < 0.1


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir()
    cg.mkdir()
    (proc / "meminfo").write_text("MemTotal: 32000000 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory_bytes(proc, cg) == (20000000 * 1024, "MemAvailable in /proc/meminfo")
    (cg / "memory.max").write_text("8589934592\n")  # 8 GiB limit, 2 GiB used
    (cg / "memory.current").write_text(str(2 * GIB) + "\n")
    assert available_memory_bytes(proc, cg) == (6 * GIB, f"the cgroup limit {cg / 'memory.max'}")
    (cg / "memory.max").write_text("max\n")  # no limit
    assert available_memory_bytes(proc, cg)[0] == 20000000 * 1024
    assert available_memory_bytes(tmp_path / "none", tmp_path / "none") is None


def test_this_process_memory_is_added_back(tmp_path, monkeypatch):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text("Name: python\nVmRSS:\t  1048576 kB\n")
    assert memory.current_rss_bytes(tmp_path) == GIB
    assert memory.current_rss_bytes(tmp_path / "none") == 0
    assert memory.current_rss_bytes() > 0  # this very process
    # MemAvailable no longer counts what this process already holds; the check adds it back
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: (2 * GIB, "test"))
    monkeypatch.setattr(memory, "current_rss_bytes", lambda: GIB)
    monkeypatch.setattr(memory, "_cuda_count", lambda: 0)
    verdict = check_before_training(
        TrainConfig.from_dict({"accelerator": "cpu", "im_size": 32, "sfe_backbone_arch": "resnet18"})
    )
    assert verdict.available == 3 * GIB
