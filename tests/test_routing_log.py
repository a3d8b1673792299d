"""limoe.train.routing_log: routing over a run, from its log, on hand-computed numbers."""

import json

import pytest

from limoe.train.routing_log import (
    effective_experts,
    history_table,
    read_log,
    routing_history,
    sample_steps,
)


def test_effective_experts_is_exp_entropy():
    assert effective_experts([0.25, 0.25, 0.25, 0.25]) == pytest.approx(4.0)
    assert effective_experts([1.0, 0.0, 0.0]) == pytest.approx(1.0)
    # H = -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.5 ln 2, so exp(H) = 2 ** 1.5
    assert effective_experts([0.5, 0.25, 0.25]) == pytest.approx(2 ** 1.5)
    assert effective_experts([2, 1, 1]) == pytest.approx(2 ** 1.5)  # counts normalise
    assert effective_experts([0, 0]) == 0.0


def test_sample_steps_keeps_first_and_last():
    assert sample_steps([1, 2, 3], 6) == [1, 2, 3]
    assert sample_steps(list(range(1, 11)), 3) == [1, 5, 10]  # indices 0, round(4.5) = 4, 9
    assert sample_steps(list(range(0, 101)), 5) == [0, 25, 50, 75, 100]


def _record(step, image_usage, text_usage=None):
    routing = {"image/layer3": {"usage": image_usage, "dropped": 0.0},
               "image/layer1": {"usage": image_usage[::-1], "dropped": 0.0}}
    if text_usage:
        routing["text/layer1"] = {"usage": text_usage, "dropped": 0.0}
    return {"step": step, "total": 1.0, "routing": routing}


def test_routing_history_from_a_log_replayed_after_a_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [_record(1, [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]), _record(2, [0.4, 0.2, 0.2, 0.2]),
             _record(2, [0.5, 0.25, 0.25, 0.0]),  # step 2 again after a resume: the last line counts
             _record(3, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0, 0])]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = read_log(log)
    assert [r["step"] for r in records] == [1, 2, 3]
    history = routing_history(records, points=6)
    assert list(history) == ["image/layer1", "image/layer3", "text/layer1"]  # modality, then layer number
    layer3 = history["image/layer3"]
    assert [p["step"] for p in layer3] == [1, 2, 3]
    assert [p["effective_experts"] for p in layer3] == [4.0, round(2 ** 1.5, 3), 1.0]
    assert [p["top_share"] for p in layer3] == [0.25, 0.5, 1.0]
    assert [p["step"] for p in history["text/layer1"]] == [1, 3]  # step 2 logged no text routing
    assert history["text/layer1"][0]["effective_experts"] == 2.0
    assert routing_history(read_log(log), points=2)["image/layer3"][-1]["step"] == 3
    assert routing_history([{"step": 1, "total": 1.0, "routing": {}}]) == {}  # a dense run


def test_history_table_cells():
    history = routing_history([_record(1, [0.25] * 4, [0.5, 0.5, 0, 0]), _record(2, [0.5, 0.25, 0.25, 0.0])])
    rows = history_table(history)
    assert rows[0] == "| layer | step 1 | step 2 |"
    assert rows[2] == "| image/layer1 | 4.00 / 25% | 2.83 / 50% |"
    assert rows[4] == "| text/layer1 | 2.00 / 50% | - |"
    assert history_table({}) == []
