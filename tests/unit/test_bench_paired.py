"""The paired drains' summary: each pair's ratios, head against base, and their medians."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bench.common import cpu_by_role
from bench.paired import Drain, Pair, export_tree, median, parse_args, summary


def test_each_pair_is_judged_against_its_own_base_and_the_medians_follow() -> None:
    pairs = [
        Pair(Drain(4000.0, 40.0, 100.0), Drain(5000.0, 30.0, 90.0)),
        Pair(Drain(2000.0, 50.0, 120.0), Drain(2200.0, 45.0, 96.0)),
        Pair(Drain(3000.0, None), Drain(3300.0, 20.0, 80.0)),
    ]
    lines = summary(pairs)
    assert lines[2] == "| 1 | 4,000 | 5,000 | 1.25 | 40.0 | 30.0 | 0.75 | 100.0 | 90.0 | 0.90 |"
    assert lines[3] == "| 2 | 2,000 | 2,200 | 1.10 | 50.0 | 45.0 | 0.90 | 120.0 | 96.0 | 0.80 |"
    # A server elsewhere, or a base that did not measure the relay: no ratio for that pair.
    assert lines[4] == "| 3 | 3,000 | 3,300 | 1.10 | - | 20.0 | - | - | 80.0 | - |"
    # The median of the ratios, not the ratio of the medians (3,300 / 3,000 here).
    assert lines[5] == (
        "| median | 3,000 | 3,300 | 1.10 | 45.0 | 30.0 | 0.82 | 110.0 | 90.0 | 0.85 |"
    )


def test_the_purges_get_their_columns_only_when_measured() -> None:
    pairs = [Pair(Drain(4000.0, 40.0, 100.0, 32.0, 20.0), Drain(4000.0, 40.0, 100.0, 8.0, 5.0))]
    lines = summary(pairs)
    assert lines[0].endswith(
        "| base purge PG us | head purge PG us | head/base "
        "| base forget PG us | head forget PG us | head/base |"
    )
    assert lines[2].endswith("| 32.0 | 8.0 | 0.25 | 20.0 | 5.0 | 0.25 |")
    assert "purge" not in summary([Pair(Drain(1.0, 1.0), Drain(1.0, 1.0))])[0]


def test_the_claimers_and_markers_share_of_postgresql_gets_columns_when_split() -> None:
    base = Drain(4000.0, 40.0, 100.0)  # a base whose drain did not split the server's CPU
    head = Drain(4000.0, 30.0, 100.0, pg_roles={"claimer": 18.0, "relay": 1.0})
    lines = summary([Pair(base, head)])
    assert lines[0].endswith(
        "| base claimer PG us | head claimer PG us | head/base "
        "| base marker PG us | head marker PG us | head/base |"
    )
    # A role with no backend in the split took nothing; an unsplit side is unknown.
    assert lines[2].endswith("| - | 18.0 | - | - | 0.0 | - |")
    assert "(PostgreSQL for the claimer 18.0 us, relay 1.0 us)" in str(head)
    assert "claimer" not in summary([Pair(base, base)])[0]


def test_backend_cpu_is_grouped_by_role_and_a_new_backend_counts_from_zero() -> None:
    before = {(10, "t0"): ("claimer", 1.0), (11, "t0"): ("marker", 2.0), (13, "t0"): ("relay", 9.0)}
    after = {
        (10, "t0"): ("claimer", 1.5),
        (11, "t0"): ("marker", 2.25),
        (12, "t1"): ("claimer", 0.5),
        (13, "t2"): ("relay", 0.75),  # pid 13 reused by a new backend: counted from zero
    }
    assert cpu_by_role(before, after) == {"claimer": 1.0, "marker": 0.25, "relay": 0.75}
    assert cpu_by_role(None, after) is None


def test_median_skips_what_is_unknown() -> None:
    assert median([None, 3.0, 1.0]) == 2.0
    assert median([None]) is None


def _commit(repo: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True, capture_output=True)


def test_the_base_is_its_revisions_files_and_one_without_the_drain_is_refused(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    _commit(repo, {"README.md": "old"})
    with pytest.raises(SystemExit, match=re.escape("has no bench/drain.py")):
        export_tree("HEAD", tmp_path / "old", repo)
    _commit(repo, {"bench/drain.py": "# the drain", "README.md": "new"})
    sha = export_tree("HEAD", tmp_path / "new", repo)
    assert len(sha) == 40
    assert (tmp_path / "new" / "README.md").read_text() == "new"
    assert not (tmp_path / "new" / ".git").exists()


def test_pairs_and_effects_must_be_positive() -> None:
    assert parse_args(["--base", "main"]).pairs == 3
    with pytest.raises(SystemExit):
        parse_args(["--base", "main", "--pairs", "0"])
