"""The benchmarks run (short mode) and write a complete report; the numbers are not checked.

Benchmarks are not timed tests: on a shared machine any threshold would be flaky. These only
prove that ``python -m bench --short`` still works end to end, so ``make bench`` does not rot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main


def _report(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data


def test_short_host_benchmarks_write_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "latest.json"
    assert main(["--short", "--no-vm", "--output", str(out)]) == 0
    report = _report(out)
    assert report["errors"] == {}
    figures = report["figures"]
    assert isinstance(figures, dict)
    for key in (
        "fig1_headless.ours.map.4KiB",
        "fig1_headless.ours.unmap.64MiB",
        "fig2.1024.map",
        "fig2.1024.rss_per_mapping",
        "fig2.ratio.map.1024_vs_16",
        "fig3.inproc.region_read_cpu",
        "fig3.inproc.region_read_round_trip",
        "fig3.floor.region_read_cpu",
        "fig3.floor.region_read_round_trip",
        "fig3.ratio.ours_vs_floor.region_read_cpu",
        "fig3.ratio.ours_vs_floor.region_read_round_trip",
    ):
        figure = figures[key]
        assert figure["min"] <= figure["median"] <= figure["max"], key
    assert "shared 2-core" in str(report["note"])
    assert report["details"]["fig3_region_read_stages_us"]  # type: ignore[index]
    assert report["details"]["fig3_floor_copy_ns"]["process_vm_readv_ns"] > 0  # type: ignore[index]
    assert "fig3.inproc.region_read_cpu" in capsys.readouterr().out


def test_without_a_compiler_the_floor_is_an_error_and_ours_still_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    out = tmp_path / "latest.json"
    assert main(["--short", "--only", "fig3", "--no-vm", "--output", str(out)]) == 1
    report = _report(out)
    errors = report["errors"]
    assert isinstance(errors, dict)
    assert list(errors) == ["fig3.floor"]
    assert "no usable C compiler" in errors["fig3.floor"]
    figures = report["figures"]
    assert isinstance(figures, dict)
    assert "fig3.inproc.region_read_cpu" in figures
    assert not any(key.startswith(("fig3.floor", "fig3.ratio.ours_vs_floor")) for key in figures)


@pytest.mark.vm
def test_short_vm_benchmarks_write_a_report(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    status = main(["--short", "--only", "vm", "--output", str(out)])
    report = _report(out)
    assert report["errors"] == {}, report["errors"]
    assert status == 0
    figures = report["figures"]
    assert isinstance(figures, dict)
    for key in (
        "fig1.ratio.map.4KiB",
        "fig3.guest.ours_bar4.read.w8",
        "fig3.guest.edu_bar0.read.w8",
        "fig4.ratio.rand_4KiB",
        "fig5.e2e_check",
    ):
        assert key in figures, key
    # Where a guest read of our BAR 4 goes: both processes' CPU clocks moved, within the wall time.
    details = report["details"]
    assert isinstance(details, dict)
    split = details["fig3_guest_read_split_us"]
    assert 0 < split["emulator_cpu"] < split["wall"], split
    assert split["qemu_cpu"] > 0, split
