"""Download, extraction and CIFAR-10 conversion against a real HTTP server on 127.0.0.1 serving
small archives built here in CIFAR-10's python-pickle format."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from visionflow.data.download import CIFAR10_ARCHIVE, download_url, prepare_cifar10, safe_extract
from visionflow.data.splits import resolve_dataset
from visionflow.errors import DatasetError

CLASSES = ["airplane", "automobile", "bird"]
PER_BATCH = 4


def batch_bytes(seed: int, n: int = PER_BATCH) -> tuple[bytes, np.ndarray, list[int]]:
    """One batch pickled as the original (Python 2 pickles: bytes keys)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [(seed + i) % len(CLASSES) for i in range(n)]
    batch = {b"data": data, b"labels": labels, b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}
    return pickle.dumps(batch, protocol=2), data, labels


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def build_archive(path: Path, overrides: dict[str, bytes] | None = None) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a CIFAR-10-format tar.gz; returns the data and labels of every batch by name."""
    contents = {}
    members = {"batches.meta": pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}, protocol=2)}
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        members[name], data, labels = batch_bytes(seed)
        contents[name] = (data, labels)
    members.update(overrides or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            add_bytes(tar, f"cifar-10-batches-py/{name}", payload)
    return contents


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    failures_left = 0  # per server: answer this many requests with 503 before serving files

    def do_GET(self) -> None:
        if self.server.failures_left > 0:  # type: ignore[attr-defined]
            self.server.failures_left -= 1  # type: ignore[attr-defined]
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, Path, http.server.ThreadingHTTPServer]]:
    """(base URL, folder it serves, server) on an ephemeral 127.0.0.1 port."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: QuietHandler(*a, directory=str(root)))
    httpd.failures_left = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_url() -> str:
    """A URL on a port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{CIFAR10_ARCHIVE}"


def test_prepare_cifar10_builds_png_tree(server, tmp_path, closed_url):
    base_url, served, _ = server
    contents = build_archive(served / CIFAR10_ARCHIVE)
    data_dir = tmp_path / "data"
    tree = prepare_cifar10(
        data_dir, url=f"{base_url}/{CIFAR10_ARCHIVE}", md5=md5_of(served / CIFAR10_ARCHIVE), backoff=0.01
    )
    assert tree == data_dir / "cifar10" / "images"
    assert sorted(p.name for p in (data_dir / "cifar10").iterdir()) == [CIFAR10_ARCHIVE, "images"]
    assert sorted(p.name for p in tree.iterdir()) == ["test", "train"]
    train_labels = [y for i in range(1, 6) for y in contents[f"data_batch_{i}"][1]]
    for split, labels in (("train", train_labels), ("test", contents["test_batch"][1])):
        assert sorted(p.name for p in (tree / split).iterdir()) == CLASSES
        counts = {c: len(list((tree / split / c).iterdir())) for c in CLASSES}
        assert counts == {c: labels.count(i) for i, c in enumerate(CLASSES)}
    # Train image PER_BATCH is the first of data_batch_2; its pixels survive the PNG round trip.
    data, labels = contents["data_batch_2"]
    png = tree / "train" / CLASSES[labels[0]] / f"{PER_BATCH:05d}.png"
    expected = data[0].reshape(3, 32, 32).transpose(1, 2, 0)
    with Image.open(png) as image:
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)

    # Prepared once: later calls touch no network (this URL refuses connections).
    assert prepare_cifar10(data_dir, url=closed_url, backoff=0.01) == tree
    info = resolve_dataset("cifar10", data_dir=data_dir, download=False)
    assert info.classes == tuple(CLASSES) and list(info.splits) == ["train", "test"]
    assert len(info.train) == 5 * PER_BATCH and len(info.eval_split) == PER_BATCH


def test_verified_archive_is_converted_without_network(tmp_path, closed_url):
    archive = tmp_path / "data" / "cifar10" / CIFAR10_ARCHIVE
    archive.parent.mkdir(parents=True)
    build_archive(archive)
    tree = prepare_cifar10(tmp_path / "data", url=closed_url, md5=md5_of(archive), retries=0)
    assert len(list(tree.rglob("*.png"))) == 6 * PER_BATCH


def test_md5_mismatch_leaves_nothing_behind(server, tmp_path):
    base_url, served, _ = server
    build_archive(served / CIFAR10_ARCHIVE)
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetError, match="md5 check") as info:
        prepare_cifar10(data_dir, url=f"{base_url}/{CIFAR10_ARCHIVE}", md5="0" * 32, backoff=0.01)
    assert "\n" not in str(info.value)
    assert list((data_dir / "cifar10").iterdir()) == []


def test_connection_refused_fails_after_retries_with_one_clear_line(tmp_path, closed_url):
    started = time.monotonic()
    with pytest.raises(DatasetError) as info:
        prepare_cifar10(tmp_path / "data", url=closed_url, retries=2, backoff=0.01)
    message = str(info.value)
    assert closed_url in message and "3 attempt(s)" in message and "\n" not in message
    assert f"put {CIFAR10_ARCHIVE} in {tmp_path / 'data' / 'cifar10'}/" in message
    assert time.monotonic() - started < 5
    assert list((tmp_path / "data" / "cifar10").iterdir()) == []


def test_download_without_permission_to_download(tmp_path):
    with pytest.raises(DatasetError, match=f"downloading is off; put {CIFAR10_ARCHIVE}"):
        resolve_dataset("cifar10", data_dir=tmp_path, download=False)


def test_server_errors_are_retried_with_backoff(server, tmp_path):
    base_url, served, httpd = server
    (served / "file.bin").write_bytes(b"payload" * 1000)
    httpd.failures_left = 2
    dest = download_url(
        f"{base_url}/file.bin",
        tmp_path / "out" / "file.bin",
        md5=hashlib.md5(b"payload" * 1000).hexdigest(),
        retries=3,
        backoff=0.01,
    )
    assert dest.read_bytes() == b"payload" * 1000 and httpd.failures_left == 0
    assert os.listdir(tmp_path / "out") == ["file.bin"]


def test_missing_file_is_not_retried(server, tmp_path):
    base_url, _, _ = server
    with pytest.raises(DatasetError, match=r"HTTP 404.*after 1 attempt\(s\)"):
        download_url(f"{base_url}/nope.tar.gz", tmp_path / "nope.tar.gz", retries=5, backoff=10)


def test_corrupt_local_file_is_downloaded_again(server, tmp_path):
    base_url, served, _ = server
    (served / "f.bin").write_bytes(b"good")
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"partial or tampered")
    download_url(f"{base_url}/f.bin", dest, md5=hashlib.md5(b"good").hexdigest())
    assert dest.read_bytes() == b"good"


def evil_member(kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(
        {
            "dotdot": "../evil",
            "nested_dotdot": "ok/../../evil",
            "absolute": "/tmp/evil",
            "symlink": "link",
            "hardlink": "hard",
            "device": "dev",
        }[kind]
    )
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


@pytest.mark.parametrize("kind", ["dotdot", "nested_dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_members_are_refused(tmp_path, kind):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_bytes(tar, "good.txt", b"harmless")
        member = evil_member(kind)
        if member.isfile():
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
        else:
            tar.addfile(member)
    target = tmp_path / "target"
    with pytest.raises(DatasetError, match=f"Refusing to extract .*'{member.name}'"):
        safe_extract(archive, target)
    assert not target.exists()  # checked before anything is written
    assert not (tmp_path / "evil").exists()


def test_safe_extract_extracts_plain_archives(tmp_path):
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tar:
        add_bytes(tar, "a/b/c.txt", b"fine")
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "b" / "c.txt").read_bytes() == b"fine"


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DatasetError, match="Cannot extract"):
        safe_extract(tmp_path / "x.tar.gz", tmp_path / "out")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "payload,message",
    [
        (pickle.dumps({b"data": RunsCode(), b"labels": []}, protocol=2), "not allowed"),
        (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, protocol=2), r"expected \(N, 3072\)"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [7]}, protocol=2), "labels outside"),
    ],
)
def test_malicious_or_malformed_batches_are_refused(tmp_path, payload, message):
    archive = tmp_path / "data" / "cifar10" / CIFAR10_ARCHIVE
    archive.parent.mkdir(parents=True)
    build_archive(archive, overrides={"data_batch_3": payload})
    with pytest.raises(DatasetError, match=message):
        prepare_cifar10(tmp_path / "data", md5=md5_of(archive), download=False)
    assert sorted(p.name for p in archive.parent.iterdir()) == [CIFAR10_ARCHIVE]  # no half tree
