"""The journal the fault-injection tests judge "one run per try" by: its own reading and counting."""

from __future__ import annotations

from devtools.run_journal import check_journal, read_journal


def _write(tmp_path, *lines):
    path = tmp_path / "journal.txt"
    path.write_text("".join(line + "\n" for line in lines) + "start d t -1 1 cut")  # a line cut by a kill
    return read_journal(path)


def test_one_completed_run_per_task_is_clean(tmp_path):
    lines = _write(
        tmp_path,
        "start d a -1 1 r1 10.0",
        "end d a -1 1 r1 11.0",
        "start d m 0 1 pid7 10.5",
        "end d m 0 1 pid7 12.0",
    )
    report = check_journal(lines, [("d", "a", -1), ("d", "m", 0)])
    assert report.clean and report.summary() == {
        "lost": 0,
        "double_runs": 0,
        "overlaps": 0,
        "stopped_runs": 0,
    }


def test_a_stopped_run_then_a_fallback_run_in_sequence_is_one_completed_body(tmp_path):
    lines = _write(tmp_path, "start d a -1 1 r1 10.0", "start d a -1 1 pid9 14.0", "end d a -1 1 pid9 15.0")
    report = check_journal(lines, [("d", "a", -1)])
    assert report.clean and report.stopped_runs == 1 and report.completed == {("d", "a", -1): 1}


def test_lost_double_and_overlapping_runs_are_counted(tmp_path):
    lines = _write(
        tmp_path,
        "start d twice -1 1 r1 10.0",
        "end d twice -1 1 r1 11.0",
        "start d twice -1 1 r2 10.5",
        "end d twice -1 1 r2 11.5",
        "start d retried -1 1 r3 10.0",
        "end d retried -1 1 r3 11.0",
        "start d retried -1 2 r4 12.0",
        "end d retried -1 2 r4 13.0",
    )
    report = check_journal(lines, [("d", "twice", -1), ("d", "retried", -1), ("d", "never", -1)])
    assert report.lost == [("d", "never", -1)]
    assert sorted(report.double_runs) == [("d", "retried", -1), ("d", "twice", -1)]
    assert report.overlaps == [("d", "twice", -1, 1)]
    assert report.retried == [("d", "retried", -1)]
