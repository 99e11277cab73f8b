"""Reports rebuilt from committed per-run records (issue 27).

Every study under docs/ that holds a report.json (the invocation `make report` runs) must
rebuild from its records into exactly the files committed beside it. Markdown, CSV and JSON are
compared byte for byte. PNGs are compared by their size in pixels only: their bytes depend on
the matplotlib and FreeType versions that drew them, so byte equality across machines would be
fragile (within one installation the bytes are deterministic: see
`test_a_rebuild_is_deterministic`).

tests/data/records_study is such a study, made from four real split_digits runs (DER++ and
EsaCL at 0.9, seeds 0 and 1; their results.json trimmed of per-task logs) by
``python -m experiments.report --records=.../records.jsonl --out=... --paper_table
--paired_with=derpp``.
"""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys

import pytest

from esacl_jax.harness import reporting
from esacl_jax.harness.reporting import build, records

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "data" / "records_study"
OPTIONS = build.ReportOptions(paper_table=True, paired_with="derpp")
HEADER_LINES = ("- command:", "- runs:", "- 4 runs")  # where a --runs and a --records report differ


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _compare_with_committed(study: pathlib.Path, rebuilt: pathlib.Path) -> None:
    produced = sorted(p.name for p in rebuilt.iterdir())
    assert {"table.md", "table.csv", "report.json"} <= set(produced)
    for name in produced:
        new, old = (rebuilt / name).read_bytes(), study / name
        if name.endswith(".png"):
            if old.exists():  # sizes in pixels only (see the module docstring)
                assert _png_size(new) == _png_size(old.read_bytes()), name
            else:
                _png_size(new)
            continue
        assert old.exists(), f"{study}: {name} is rebuilt but not committed (make report)"
        assert new == old.read_bytes(), f"{study / name} differs from its rebuild (make report)"


def _studies() -> list[pathlib.Path]:
    return [*build.studies(REPO_ROOT / "docs"), FIXTURE]


@pytest.mark.parametrize("study", _studies(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_committed_studies_rebuild_byte_for_byte(study, tmp_path):
    build.rebuild_study(study, tmp_path)
    _compare_with_committed(study, tmp_path)


def _text_body(path: pathlib.Path) -> str:
    return "".join(line for line in path.read_text(encoding="utf-8").splitlines(True)
                   if not line.startswith(HEADER_LINES))


def test_records_round_trip_gives_the_tables_of_the_results(tmp_path):
    """results.json -> record -> table equals results.json -> table."""
    runs = reporting.load_runs(FIXTURE)
    assert len(runs) == 4
    written = records.write_records(runs, FIXTURE, tmp_path / "records.jsonl")
    assert written.read_bytes() == (FIXTURE / "records.jsonl").read_bytes()
    lines = written.read_text(encoding="utf-8").splitlines()
    assert all(len(line) < 4096 for line in lines)  # a few KB a run

    from_runs, from_records = tmp_path / "from_runs", tmp_path / "from_records"
    build.build_report(runs, from_runs, OPTIONS,
                       build.Source("python -m experiments.report --runs=RUNS", FIXTURE, "RUNS"))
    loaded = records.load_records(written)
    build.build_report(loaded, from_records, OPTIONS,
                       build.Source("cmd", tmp_path, "STUDY", records="records.jsonl"))
    names = sorted(p.name for p in from_runs.iterdir())
    assert names == sorted(p.name for p in from_records.iterdir())
    assert "accuracy_matrix_esacl.png" in names and "paired.md" in names
    for name in names:
        a, b = from_runs / name, from_records / name
        if name in ("paper_table.md", "paired.md"):  # the headers name the source
            assert _text_body(a) == _text_body(b), name
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_a_record_keeps_the_numbers_exactly(tmp_path):
    runs = reporting.load_runs(FIXTURE)
    loaded = {r["relative_path"]: r for r in records.load_records(FIXTURE / "records.jsonl")}
    for run in runs:
        back = loaded[run["relative_path"]]
        for key in ("class_il_matrix", "task_il_matrix", "training_flops", "wall_time_s"):
            assert back[key] == run[key], key
        for setting in ("class_il", "task_il"):
            for name, value in back["metrics"][setting].items():
                assert value == run["metrics"][setting][name]
        assert back["weights"] == run["weights"]
        assert back["memory"]["analytic"] == run["memory"]["analytic"]
        for read in (reporting.method_label, reporting.sparsity_of, reporting.buffer_of,
                     reporting.benchmark_of, reporting.seed_of, reporting.commit_of):
            assert read(back) == read(run), read.__name__
        assert "/work/" not in json.dumps(back["environment"])


def test_config_overrides_are_the_fields_that_differ_from_the_protocol():
    run = reporting.load_runs(FIXTURE)[-1]  # esacl seed 1
    config = json.loads(json.dumps(run["config"]))
    assert records.config_overrides(config) == {}
    config["esacl"]["gamma"], config["learning_rate"], config["data_dir"] = 1.0, 0.1, "/x"
    assert records.config_overrides(config) == {"esacl.gamma": 1.0, "learning_rate": 0.1}
    record = records.to_record({**run, "config": config}, "a/results.json")
    assert record["label"] == "esacl[gamma=1]" and record["split"] == "test"
    back = records.to_run(record, "root")
    assert back["config"]["esacl"]["gamma"] == 1.0 and back["relative_path"] == "a/results.json"


def test_a_rebuild_is_deterministic(tmp_path):
    build.rebuild_study(FIXTURE, tmp_path / "a")
    build.rebuild_study(FIXTURE, tmp_path / "b")
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_records_without_an_invocation_and_bad_records_are_refused(tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "records.jsonl").write_text("")
    with pytest.raises(build.ReportError, match="no report.json names it"):
        build.studies(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"record": 1}\n')
    with pytest.raises(records.RecordsError, match=r"bad.jsonl:1: not a run record \(no path"):
        records.load_records(bad)
    bad.write_text("{nope\n")
    with pytest.raises(records.RecordsError, match=r"bad.jsonl:1: not JSON"):
        records.load_records(bad)


def test_report_cli_fails_in_one_line_on_missing_records(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.report",
                           f"--records={tmp_path / 'none.jsonl'}", f"--out={tmp_path}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: cannot read {tmp_path / 'none.jsonl'}: [Errno 2] No such file or directory: "
        f"'{tmp_path / 'none.jsonl'}'"]
