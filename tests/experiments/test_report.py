import pytest

from experiments.common import records as records_io
from experiments.common import report


def test_records_round_trip_and_group(tmp_path):
    path = tmp_path / "m.jsonl"
    records = [{"method": m, "seed": s, "step": t, "kind": "train", "flip_rate": 0.1 * t} for m in ("a", "b")
               for s in (0, 1) for t in (1, 2, 3, 4)]
    for r in records:
        records_io.append_record(path, r)
    assert records_io.read_records(path) == records
    runs = report.group_runs(records)
    assert sorted(runs) == ["a", "b"] and sorted(runs["a"]) == [0, 1] and len(runs["a"][1]) == 4
    assert report.late_mean(runs["a"][0], "flip_rate", steps=4) == pytest.approx(0.4)  # step 4 > 0.75 * 4 only
    assert report.late_mean(runs["a"][0], "flip_rate", steps=2) == pytest.approx(0.3)  # steps 2, 3, 4 > 1.5


def test_format_spread_and_curves_on_common_steps(tmp_path):
    assert report.format_spread([-0.5, 0.1], 2, signed=True) == "-0.20 ± 0.30"
    by_seed = {0: [{"step": 1, "x": 1.0}, {"step": 2, "x": 3.0}], 1: [{"step": 2, "x": 5.0}]}
    assert report.seed_mean_curve(by_seed, "x") == ([2], [4.0])  # step 1 is missing from seed 1
    report.plot_curves({"dense": by_seed, "sste": by_seed}, "x", tmp_path / "x.png", "x", log=True)
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
