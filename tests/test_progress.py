import io

from dplm.progress import LOG_SECONDS, LogLines, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_per_tenth_or_per_interval_not_per_step(monkeypatch):
    """Written to a file (no terminal) progress is plain lines: one every tenth of the work, or
    after LOG_SECONDS without one, and none repainted."""
    clock = Clock()
    monkeypatch.setattr("dplm.progress.time.monotonic", clock)
    stream = io.StringIO()
    bar = progress(150, "training", "steps", stream=stream)
    assert isinstance(bar, LogLines)
    for step in range(150):
        clock.now += 0.1
        bar.set_postfix({"loss": f"{2 - step / 100:.3g}"})
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 10
    assert lines[0] == "training: 15/150 steps (10%), loss 1.86, 2 s" and lines[-1].startswith("training: 150/150 steps (100%)")
    stream = io.StringIO()
    bar = progress(1000, "sampling", "rows", stream=stream)
    clock.now += LOG_SECONDS + 1  # slow work: a line after LOG_SECONDS though far from a tenth
    bar.update(3)
    assert stream.getvalue().splitlines() == [f"sampling: 3/1000 rows (0%), {LOG_SECONDS + 1:.0f} s"]


def test_off_means_silent():
    stream = io.StringIO()
    bar = progress(10, "training", "steps", enabled=False, stream=stream)
    bar.update(10)
    bar.close()
    assert stream.getvalue() == ""
