"""``bnstudy report``: the main job's headline findings from the files the other commands wrote."""

from __future__ import annotations

import json

from bnstudy.commands import main


def test_report_names_each_finding_and_its_file(two_rank_runs, tmp_path, capsys):
    bn, syncbn = (str(two_rank_runs[norm]) for norm in ("bn", "syncbn"))
    assert main(["compare", bn, syncbn, "--out", str(tmp_path)]) == 0
    assert main(["trace", "compare", bn, syncbn, "--out", str(tmp_path / "trace-compare.json")]) == 0
    assert main(["export", syncbn, "--out", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "export.json")]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    rows = json.loads((tmp_path / "compare.json").read_text())
    delta = 100 * (rows[1]["final_test_acc"] - rows[0]["final_test_acc"])
    assert lines[0].startswith("test accuracy: bn ") and f"{delta:+.2f} points" in lines[0]
    assert "(synthetic data)" in lines[0] and lines[0].endswith(f"[{tmp_path / 'compare.json'}]")
    assert f"syncbn {rows[1]['running_mean_max_abs_diff']:.2e}" in lines[1] and "syncbn 0.00e+00" in lines[1]
    categories = json.loads((tmp_path / "trace-compare.json").read_text())["categories"]
    sync, wait = categories["bn_sync"], categories["rank_wait"]
    assert sync["a_ms"] == 0 < sync["b_ms"] and f"({sync['b_share']:.1%})" in lines[2]
    assert f"waiting for other ranks: A {wait['a_ms']:.2f} ms ({wait['a_share']:.1%})" in lines[2]
    assert "0 BatchNormalization nodes; onnxruntime parity passed" in lines[3]
    assert lines[3].endswith(f"[{tmp_path / 'export.json'}]")


def test_report_without_any_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
