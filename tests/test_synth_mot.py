"""`polyp-ssl synth --layout mot`: the tracker's faults are in the written files at the rates
OUT/synth_layout.json states, measured here from gt.txt and the tracks files alone (boxes matched
by IoU), not from the generator's own counts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

CLI = [sys.executable, "-m", "polyp_ssl"]
MATCH_IOU = 0.3


def _read_mot(path: Path) -> dict[int, dict[int, tuple[tuple[float, ...], float]]]:
    """{frame: {id: (box, conf)}} of a MOT box file."""
    out: dict[int, dict[int, tuple[tuple[float, ...], float]]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        v = line.split(",")
        out[int(v[0])][int(v[1])] = (tuple(float(c) for c in v[2:6]), float(v[6]))
    return out


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _near(a, b, distance: float) -> bool:
    d = math.hypot(a[0] + a[2] / 2 - b[0] - b[2] / 2, a[1] + a[3] / 2 - b[1] - b[3] / 2)
    return d < distance * max(a[2], a[3], b[2], b[3])


def _runs(frames: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for f in sorted(frames):
        if runs and f == runs[-1][-1] + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    return runs


@pytest.fixture(scope="module")
def mot(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-mot") / "raw"
    cmd = [*CLI, "synth", str(out), "--layout", "mot", "--videos", "6", "--frames-per-video", "240"]
    cmd += ["--width", "160", "--height", "128", "--seed", "2", "--workers", "1", "--quiet"]
    subprocess.run(cmd, check=True, timeout=240)
    return out


def _measure(raw: Path, faults: dict) -> dict[str, dict[str, float]]:
    """Per sequence, from the files: encounters (gt), id switches, new ids after gaps, false
    positive tracks and the box jitter of matched boxes."""
    out = {}
    for seqinfo in sorted(raw.glob("*/*/seqinfo.ini")):
        seq = seqinfo.parent
        gt = _read_mot(seq / "gt" / "gt.txt")
        trk = _read_mot(raw / "tracks" / f"{seq.name}.txt")
        n_frames = int(dict(ln.split("=") for ln in seqinfo.read_text().splitlines()[1:])["seqLength"])
        match: dict[int, list[tuple[int, int | None]]] = defaultdict(list)  # track -> [(frame, gt id)]
        errors = []
        for f, boxes in trk.items():
            for tid, (box, _) in boxes.items():
                best = max(gt.get(f, {}).items(), key=lambda kv: _iou(box, kv[1][0]), default=None)
                ok = best is not None and _iou(box, best[1][0]) >= MATCH_IOU
                match[tid].append((f, best[0] if ok else None))
                if ok:
                    g = best[1][0]
                    errors += [(box[0] - g[0]) / g[2], (box[2] - g[2]) / g[2]]
        swaps = set()  # (frame, the two polyps): a track that changes polyp (a swap changes one or two)
        for seq_ids in match.values():
            seen = sorted(seq_ids)
            for (_, a), (f, b) in zip(seen, seen[1:], strict=False):
                if a is not None and b is not None and a != b:
                    swaps.add((f, frozenset((a, b))))
        encounters, close_before = 0, set()
        for f in range(1, n_frames + 1):
            ks = sorted(gt.get(f, {}))
            close = {
                (a, b)
                for i, a in enumerate(ks)
                for b in ks[i + 1 :]
                if _near(gt[f][a][0], gt[f][b][0], faults["encounter_distance"])
            }
            before = gt.get(f - 1, {})
            encounters += sum(1 for a, b in close - close_before if a in before or b in before)
            close_before = close
        on = {(f, g): t for t, m in match.items() for f, g in m if g is not None}  # (frame, polyp) -> track
        returns = new_ids = 0
        for k in {k for b in gt.values() for k in b}:
            runs = _runs([f for f, b in gt.items() if k in b])
            for before, run in zip(runs, runs[1:], strict=False):  # every return after a gap
                returns += 1
                new_ids += on.get((run[0], k)) not in (None, on.get((before[-1], k)))
        fps = [t for t, m in match.items() if all(g is None for _, g in m)]
        out[seq.name] = {
            "encounters": encounters,
            "swaps": len(swaps),
            "returns": returns,
            "new_ids": new_ids,
            "fp_tracks": len(fps),
            "fp_lengths": [len(match[t]) for t in fps],
            "fp_conf": [np.mean([trk[f][t][1] for f, _ in match[t]]) for t in fps],
            "true_conf": [np.mean([trk[f][t][1] for f, _ in match[t]]) for t in match if t not in fps],
            "n_frames": n_frames,
            "jitter": float(np.std(errors)),
        }
    return out


def test_tracker_faults_at_the_stated_rates(mot: Path) -> None:
    layout = json.loads((mot / "synth_layout.json").read_text())
    faults = layout["faults"]
    assert layout["layout"] == "mot"
    got = _measure(mot, faults)
    assert len(got) == 6
    every = round(1 / faults["id_switch_rate"])
    encounters = sum(m["encounters"] for m in got.values())
    assert encounters >= 3  # this seed's videos bring polyps close together
    for seq, m in got.items():
        # id switches: one encounter in `every`, the 1st, 3rd, ... of each video
        assert m["swaps"] == math.ceil(m["encounters"] / every), seq
        # a new id after every gap: the track on a returning polyp starts on the return frame
        assert m["new_ids"] == m["returns"] * faults["new_id_after_gap"], seq
        # false positives: one per fp_every_frames frames, short and of low confidence
        lo, hi = faults["fp_frames"]
        assert m["fp_tracks"] == len(range(0, m["n_frames"] - hi, faults["fp_every_frames"])), seq
        assert all(lo <= n <= hi for n in m["fp_lengths"]), seq
        assert all(faults["fp_conf"][0] <= c <= faults["fp_conf"][1] for c in m["fp_conf"]), seq
        assert all(c >= faults["true_conf"][0] for c in m["true_conf"]), seq
    swaps = sum(m["swaps"] for m in got.values())
    assert abs(swaps / encounters - faults["id_switch_rate"]) <= len(got) / encounters
    jitter = np.mean([m["jitter"] for m in got.values()])
    assert 0.5 * faults["jitter"] < jitter < 1.5 * faults["jitter"]
    assert sum(m["returns"] for m in got.values()) > 0
    # the generator's own counts agree with what the files show
    assert layout["counts"]["id_switches"] == swaps
    assert layout["counts"]["false_positives"] == sum(m["fp_tracks"] for m in got.values())


def test_mot_layout_files(mot: Path) -> None:
    seqs = sorted(p.parent.name for p in mot.glob("*/*/seqinfo.ini"))
    assert seqs == sorted(p.stem for p in (mot / "tracks").glob("*.txt"))
    for ini in mot.glob("*/*/seqinfo.ini"):
        info = dict(ln.split("=") for ln in ini.read_text().splitlines()[1:])
        frames = sorted((ini.parent / info["imDir"]).iterdir())
        assert [f.name for f in frames] == [f"{i:06d}.jpg" for i in range(1, int(info["seqLength"]) + 1)]
        assert (ini.parent / "gt" / "gt.txt").is_file()
