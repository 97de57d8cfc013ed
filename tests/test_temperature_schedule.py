"""The temporal temperature schedule's length (--sampler_ttb_schedule): `epochs` is the paper's
(over --max_epochs), `steps` spans the epochs the run trains, so its last epoch is at t_max."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

import polyp_ssl.planned_source as planned_source
import polyp_ssl.pooled_source as pooled_source
from polyp_ssl.bags import epochs_trained, temperature_schedule, temporal_temperature
from polyp_ssl.stream import BagStream, StreamParams, build_index
from polyp_ssl.train_cli import resolve_config
from tests.shard_factory import make_root

P = StreamParams(
    batch_size=8,
    n_views=2,
    fragment_length=2,
    fragment_stride=4,
    min_tracklet_length=4,
    im_size=16,
    aug_anchorcrop=True,
    max_epochs=50,
)


def test_the_default_is_the_papers_schedule_over_max_epochs():
    sch = temperature_schedule("epochs", 0.3, 12.0, 50, max_steps=200, batches_per_epoch=125)
    assert [sch.at(e) for e in range(60)] == [temporal_temperature(e, 50, 0.3, 12.0) for e in range(60)]
    assert sch.at(0) == 0.3 and sch.at(1) == pytest.approx(0.3 + (1 - math.cos(math.pi / 50)) / 2 * 11.7)
    assert StreamParams().sampler_ttb_schedule == "epochs"


@pytest.mark.parametrize(
    ("max_steps", "per_epoch", "trained"),
    [(200, 125, 2), (1000, 60, 17), (60, 60, 1), (-1, 60, 50), (10**6, 60, 50), (121, 60, 3)],
)
def test_steps_spans_the_epochs_trained_from_t_min_to_t_max(max_steps, per_epoch, trained):
    assert epochs_trained(50, max_steps, per_epoch) == trained
    sch = temperature_schedule("steps", 0.3, 12.0, 50, max_steps, per_epoch)
    values = [sch.at(e) for e in range(trained)]
    assert values[0] == 0.3
    if trained > 1:
        assert values[-1] == pytest.approx(12.0)
        assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert sch.at(trained + 5) == pytest.approx(12.0)  # capped at the end


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="--sampler_ttb_schedule 'linear'"):
        temperature_schedule("linear", 0.3, 12.0, 50)
    with pytest.raises(ValueError, match=r"--sampler_ttb_schedule 'linear': choose one of"):
        resolve_config(["--dataset_root", "x", "--sampler_ttb_schedule", "linear"]).validate()


def test_the_flag_is_a_setting_recorded_with_the_run():
    cfg = resolve_config(
        [
            "--dataset_root",
            "x",
            "--aug_anchorcrop",
            "--eval_aug_anchorcrop",
            "--sampler_ttb_schedule",
            "steps",
        ]
    )
    assert cfg.stream.sampler_ttb_schedule == "steps"
    assert cfg.to_dict()["sampler_ttb_schedule"] == "steps"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(
        tmp_path_factory.mktemp("ttb") / "root",
        videos={"train": 4, "val": 1},
        frames_per_tracklet=24,
        videos_per_shard=2,
    )


@pytest.mark.parametrize("access", ["random", "sequential"])
def test_the_last_trained_epoch_draws_its_bags_at_t_max(root, monkeypatch, access):
    """Both batch sources draw each epoch's bags at the schedule's temperature: with `steps` and a
    --max_steps of three epochs, epoch 0 at t_min and epoch 2 (the one holding the last step) at t_max."""
    seen: list[float] = []
    if access == "random":
        real = planned_source.plan_epoch

        def plan_epoch(frags, sampler, n_views, n_bags, seed, epoch, temperature):
            seen.append(temperature)
            return real(frags, sampler, n_views, n_bags, seed, epoch, temperature)

        monkeypatch.setattr(planned_source, "plan_epoch", plan_epoch)
    else:
        real_epoch = pooled_source._Epoch

        def epoch_run(epoch, stream, skip, videos, temperature):
            seen.append(temperature)
            return real_epoch(epoch, stream, skip, videos, temperature)

        monkeypatch.setattr(pooled_source, "_Epoch", epoch_run)
    p = replace(P, sampler_ttb_schedule="steps", shard_access=access)
    index = build_index(root, "train", p)
    per_epoch = BagStream(index, p).length
    ds = BagStream(index, p, max_steps=3 * per_epoch - 1)
    for epoch in range(3):
        ds.shared.epoch.value = epoch
        assert len(list(ds)) == per_epoch
    assert seen == [0.3, pytest.approx(0.3 + 11.7 / 2), pytest.approx(12.0)]
    # the paper's schedule on the same run stays near its start
    paper = BagStream(index, replace(p, sampler_ttb_schedule="epochs"), max_steps=3 * per_epoch - 1)
    assert paper.schedule.at(2) == temporal_temperature(2, 50, 0.3, 12.0)
    assert paper.schedule.at(2) < 0.5
