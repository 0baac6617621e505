"""`visionflow gc` as users run it (a real subprocess): the --dry-run --json document, and a
bad value as one error line."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import make_run
from tests.helpers import run_visionflow as run


def test_dry_run_json_lists_what_it_would_remove_and_removes_nothing(tmp_path: Path) -> None:
    old = make_run(tmp_path, "old", days_ago=100)
    make_run(tmp_path, "new", days_ago=1)
    result = run("gc", "--output", str(tmp_path), "--keep-last", "1", "--dry-run", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan) == {"output_dir", "keep_last", "keep_days", "kept", "removals", "freed_bytes", "dry_run"}
    assert plan["dry_run"] is True and (plan["keep_last"], plan["keep_days"]) == (1, 30.0)
    assert plan["kept"] == {"new": "one of the newest 1"}
    assert plan["removals"] == [{"path": str(old), "kind": "run", "bytes": plan["freed_bytes"]}]
    assert plan["freed_bytes"] > 1_000_000 and old.is_dir()


def test_text_output_and_a_bad_value_in_one_line(tmp_path: Path) -> None:
    make_run(tmp_path, "old", days_ago=100)
    result = run("gc", "--output", str(tmp_path), "--keep-last", "0", "--keep-days", "0", cwd=tmp_path)
    assert result.returncode == 0 and not (tmp_path / "runs" / "old").exists()
    assert result.stdout.splitlines()[0].startswith(f"removed run {tmp_path / 'runs' / 'old'} (1.0 MB)")
    bad = run("gc", "--output", str(tmp_path), "--keep-last", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "error: Invalid --keep-last -1: expected a number >= 0 (0 keeps none by this rule)"
    ]
