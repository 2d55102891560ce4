"""The serving profile's aggregation of py-spy's collapsed stacks, hand-computed."""

from benchmarks.serving.profile import top_frames


def test_self_and_inclusive_shares_count_each_frame_once_per_stack():
    raw = "\n".join(
        [
            "proc;main;handle;search 6",
            "proc;main;handle;handle 2",  # recursion: handle counts once in inclusive
            "proc;main;idle 2",
        ]
    )
    out = top_frames(raw, 10)
    assert out["samples"] == 10
    assert {r["frame"]: r["share"] for r in out["self"]} == {"search": 0.6, "handle": 0.2, "idle": 0.2}
    incl = {r["frame"]: r["share"] for r in out["inclusive"]}
    assert incl == {"main": 1.0, "handle": 0.8, "search": 0.6, "idle": 0.2}  # "proc" (the process) left out
