"""The typed run manifest: its JSON Schema file is current, it round-trips atomically, bad or
missing manifests are one-line errors, schema-1 manifests still load, provenance is recorded."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from visionflow.config import build_config
from visionflow.errors import ConfigError
from visionflow.manifest import (
    MANIFEST_NAME,
    MODULE_OWNERS_FILE,
    SCHEMA_VERSION,
    Manifest,
    TimingRecord,
    _module_owners,
    imported_packages,
)

REPO = Path(__file__).resolve().parents[2]


def started(tmp_path: Path) -> Manifest:
    config = build_config({"training": {"epochs": 2, "seed": 3}}).resolved()
    return Manifest.start("demo", config, "2026-01-01T00:00:00+00:00", "flow-run-id")


def test_schema_file_is_generated_from_the_model() -> None:
    on_disk = json.loads((REPO / "docs" / "manifest.schema.json").read_text())
    assert on_disk == Manifest.model_json_schema(), (
        "docs/manifest.schema.json is stale: regenerate it with "
        "`python -m visionflow.manifest > docs/manifest.schema.json`"
    )


def test_round_trip_and_finish(tmp_path: Path) -> None:
    manifest = started(tmp_path)
    assert (manifest.schema_version, manifest.status, manifest.seed, manifest.finished_at) == (
        SCHEMA_VERSION,
        "running",
        3,
        None,
    )
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    failed = manifest.finish("failed", timing=TimingRecord(total_seconds=1.5), error="boom")
    assert failed.status == "failed" and failed.finished_at and failed.timing.train_seconds is None
    assert failed.config == manifest.config and failed.run_name == "demo"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_provenance_lists_every_imported_package(tmp_path: Path) -> None:
    manifest = started(tmp_path)
    assert set(manifest.versions) == {"python", "torch", "torchvision", "prefect"}
    assert {"pydantic", "PyYAML"} <= set(manifest.packages)  # imported by visionflow.config/manifest
    assert "pytest" in imported_packages() and sys.modules.get("pytest") is not None
    import torch  # noqa: F401  (a package imported later is listed from then on)

    assert "torch" in imported_packages()


def test_package_owners_are_kept_until_a_folder_on_sys_path_changes(tmp_path: Path, monkeypatch) -> None:
    # Which distribution provides each module is read from every installed package's file list
    # (0.3-1 s): one process computes it, later ones read it back, an install recomputes it.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    stored = tmp_path / "cache" / "visionflow" / MODULE_OWNERS_FILE
    try:
        _module_owners.cache_clear()
        assert _module_owners()["torch"] == {"torch": version("torch")}
        values = json.loads(stored.read_text())
        values["owners"]["marker"] = {"marker": "1.0"}  # shows whether the next process reads the file
        stored.write_text(json.dumps(values))
        _module_owners.cache_clear()
        assert _module_owners()["marker"] == {"marker": "1.0"}
        (site / "newpackage-1.0.dist-info").mkdir()  # what installing a package does to its folder
        _module_owners.cache_clear()
        assert "marker" not in _module_owners() and "marker" not in json.loads(stored.read_text())["owners"]
    finally:
        _module_owners.cache_clear()


def test_missing_or_foreign_manifest_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"run_name": "x"}))
    with pytest.raises(ConfigError, match="is not a visionflow run manifest: field 'status'"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="is unreadable"):
        Manifest.load(tmp_path)


def test_schema_1_manifest_still_loads(tmp_path: Path) -> None:
    values = started(tmp_path).model_dump(mode="json")
    del values["schema_version"], values["packages"]
    values["manifest_version"] = 1
    values["config"]["data"]["num_workers"] = -1  # that time's loader setting (invalid today): dropped
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(values))
    loaded = Manifest.load(tmp_path)
    assert loaded.schema_version == 1 and loaded.packages == {} and loaded.run_name == "demo"
