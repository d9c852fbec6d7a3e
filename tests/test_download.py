"""gpt_core.download: checksums, atomic writes, retries, mirrors and safe extraction.

Everything goes over loopback (tests/mirror_server.py) or the local filesystem; the real
inputs come from the shared offline mirror, never from the internet.
"""

import hashlib
import json
import os
import re
import socket
import zipfile
from pathlib import Path

import pytest
from mirror_server import MirrorServer

from flows.resources import SOURCES_MANIFEST
from gpt_core.download import (
    Source,
    SpeedLimits,
    fetch,
    fetch_url,
    load_sources,
    mirror_url,
)
from gpt_core.errors import GptflowError

MIRROR = Path(os.environ.get("GPTFLOW_MIRROR") or Path(__file__).resolve().parents[2] / "shared/data/mirror")
needs_mirror = pytest.mark.skipif(
    not MIRROR.is_dir(), reason=f"no mirror folder at {MIRROR}; set GPTFLOW_MIRROR to the shared data mirror folder"
)
FAST = {"backoff": 0.01, "progress": False}
PAYLOAD = b"hello, mirror\n" * 100


@pytest.fixture
def sources():
    return load_sources(SOURCES_MANIFEST)


@pytest.fixture
def mirror_server():
    with MirrorServer(MIRROR) as server:
        yield server


@pytest.fixture
def toy(tmp_path):
    """A one-file mirror in tmp_path served over loopback, its Source, and an empty download folder."""
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "toy.txt").write_bytes(PAYLOAD)
    source = Source(
        name="toy",
        url="https://example.invalid/toy.txt",
        mirror_path="toy.txt",
        filename="toy.txt",
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        license="test",
    )
    out = tmp_path / "out"
    with MirrorServer(root) as server:
        yield server, source, out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_mirror
def test_the_verdict_over_http_then_cached(sources, mirror_server, tmp_path):
    source = sources["the-verdict"]
    path = fetch(source, tmp_path, mirror=mirror_server.url, **FAST)
    assert path == tmp_path / "the-verdict.txt"
    assert sha256(path) == source.sha256
    assert fetch(source, tmp_path, mirror=mirror_server.url, **FAST) == path
    assert mirror_server.requests["the-verdict.txt"] == 1  # the second fetch found a verified file


@needs_mirror
def test_sms_zip_extracts_verified_member(sources, mirror_server, tmp_path):
    source = sources["sms-spam"]
    path = fetch(source, tmp_path, mirror=mirror_server.url, **FAST)
    assert path == tmp_path / "SMSSpamCollection"
    assert sha256(path) == source.sha256
    assert len(path.read_bytes().splitlines()) == 5574
    assert os.listdir(tmp_path) == ["SMSSpamCollection"]  # the zip itself is not kept
    fetch(source, tmp_path, mirror=mirror_server.url, **FAST)
    assert mirror_server.requests["sms+spam+collection.zip"] == 1


@needs_mirror
def test_every_manifest_entry_matches_the_local_folder_mirror(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFLOW_MIRROR", str(MIRROR))
    for source in sources.values():
        assert sha256(fetch(source, tmp_path, **FAST)) == source.sha256
    assert sorted(os.listdir(tmp_path)) == sorted(s.filename for s in sources.values())


def test_checksum_mismatch_leaves_nothing(toy):
    server, source, out = toy
    server.serve_bytes("toy.txt", b"changed upstream\n")
    with pytest.raises(GptflowError, match=r"sha256 mismatch for toy from http://127\.0\.0\.1:\d+/toy\.txt"):
        fetch(source, out, mirror=server.url, **FAST)
    assert os.listdir(out) == []
    assert server.requests["toy.txt"] == 1  # a wrong file is not retried


def test_failed_fetch_keeps_existing_file(toy):
    server, source, out = toy
    out.mkdir()
    (out / "toy.txt").write_bytes(b"previous version\n")
    server.serve_bytes("toy.txt", b"changed upstream\n")
    with pytest.raises(GptflowError, match="sha256 mismatch"):
        fetch(source, out, mirror=server.url, **FAST)
    assert os.listdir(out) == ["toy.txt"]
    assert (out / "toy.txt").read_bytes() == b"previous version\n"


def test_stale_file_is_replaced(toy):
    server, source, out = toy
    out.mkdir()
    (out / "toy.txt").write_bytes(b"previous version\n")
    assert fetch(source, out, mirror=server.url, **FAST).read_bytes() == PAYLOAD


def test_truncated_body_is_retried(toy):
    server, source, out = toy
    server.truncate("toy.txt", times=2)
    assert fetch(source, out, mirror=server.url, **FAST).read_bytes() == PAYLOAD
    assert server.requests["toy.txt"] == 3


def test_always_truncated_fails_cleanly(toy):
    server, source, out = toy
    server.truncate("toy.txt")
    with pytest.raises(GptflowError, match="could not download toy .* after 3 attempts: .*GPTFLOW_MIRROR"):
        fetch(source, out, mirror=server.url, retries=2, **FAST)
    assert server.requests["toy.txt"] == 3
    assert os.listdir(out) == []


def test_server_error_is_retried(toy):
    server, source, out = toy
    server.fail("toy.txt", status=500, times=2)
    assert fetch(source, out, mirror=server.url, **FAST).read_bytes() == PAYLOAD
    assert server.requests["toy.txt"] == 3


def test_404_fails_at_once(toy):
    server, source, out = toy
    server.fail("toy.txt", status=404)
    with pytest.raises(GptflowError, match=r"^toy: http://127\.0\.0\.1:\d+/toy\.txt returned HTTP 404"):
        fetch(source, out, mirror=server.url, **FAST)
    assert server.requests["toy.txt"] == 1
    assert os.listdir(out) == []


def test_unreachable_host_fails_after_retries(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(GptflowError, match=r"could not reach 127\.0\.0\.1 for toy after 3 attempts: .*refused"):
        fetch_url(f"http://127.0.0.1:{port}/toy.txt", tmp_path / "toy.txt", None, retries=2, label="toy", **FAST)
    assert os.listdir(tmp_path) == []


def test_local_folder_mirror_from_env(toy, monkeypatch):
    server, source, out = toy
    monkeypatch.setenv("GPTFLOW_MIRROR", str(server.root))
    assert fetch(source, out, **FAST).read_bytes() == PAYLOAD
    assert server.requests["toy.txt"] == 0


def test_missing_file_in_local_mirror(toy, tmp_path):
    _, source, out = toy
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    with pytest.raises(GptflowError, match="toy: .*toy.txt does not exist; check that GPTFLOW_MIRROR"):
        fetch(source, out, mirror=str(empty), **FAST)
    assert os.listdir(out) == []


def test_mirror_url():
    assert mirror_url("http://host:8000/m/", "gpt2/vocab.bpe") == "http://host:8000/m/gpt2/vocab.bpe"
    assert mirror_url("https://host/m", "a b.zip") == "https://host/m/a%20b.zip"
    assert mirror_url("/srv/mirror", "gpt2/vocab.bpe") == "file:///srv/mirror/gpt2/vocab.bpe"
    assert mirror_url("rel", "x.txt") == (Path.cwd() / "rel/x.txt").as_uri()
    with pytest.raises(GptflowError, match="GPTFLOW_MIRROR"):
        mirror_url("ftp://host/m", "x.txt")


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil.txt", "data/../../evil.txt", "..\\evil.txt"])
def test_zip_with_escaping_entry_is_refused(tmp_path, evil):
    root = tmp_path / "mirror"
    root.mkdir()
    with zipfile.ZipFile(root / "bundle.zip", "w") as zf:
        zf.writestr("data.txt", PAYLOAD)
        zf.writestr(evil, b"pwned\n")
    source = Source(
        name="bundle",
        url="https://example.invalid/bundle.zip",
        mirror_path="bundle.zip",
        filename="data.txt",
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        license="test",
        member="data.txt",
    )
    out = tmp_path / "out"
    with pytest.raises(GptflowError, match=rf"bundle: archive .*bundle\.zip has unsafe entry {re.escape(repr(evil))}"):
        fetch(source, out, mirror=str(root), **FAST)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bundle.zip", "mirror"]


def test_zip_without_member(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    with zipfile.ZipFile(root / "bundle.zip", "w") as zf:
        zf.writestr("other.txt", PAYLOAD)
    source = Source("bundle", "https://example.invalid/b.zip", "bundle.zip", "data.txt", "0" * 64, "test", "data.txt")
    with pytest.raises(GptflowError, match="has no member 'data.txt'"):
        fetch(source, tmp_path / "out", mirror=str(root), **FAST)


GOOD = {"name": "x", "url": "https://e/x", "mirror_path": "x", "filename": "x", "sha256": "a" * 64, "license": "MIT"}


@pytest.mark.parametrize(
    "manifest, message",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps([GOOD]), r'must be an object \{"sources"'),
        (json.dumps({"sources": [GOOD, {**GOOD, "checksum": "a"}]}), r"entry 1 \('x'\) has unknown key\(s\) \['checksum'\]"),
        (json.dumps({"sources": [{k: v for k, v in GOOD.items() if k != "url"}]}), r"entry 0 \('x'\) is missing key\(s\) \['url'\]"),
        (json.dumps({"sources": [{**GOOD, "sha256": "ABC"}]}), "sha256 must be 64 lowercase hex digits"),
        (json.dumps({"sources": [{**GOOD, "member": 3}]}), r"\['member'\] must be strings"),
        (json.dumps({"sources": [GOOD, GOOD]}), "duplicate source name 'x'"),
    ],
)
def test_malformed_manifest(tmp_path, manifest, message):
    path = tmp_path / "sources.json"
    path.write_text(manifest)
    with pytest.raises(GptflowError, match=message):
        load_sources(path)


def test_manifest_loads(sources):
    assert set(sources) == {"the-verdict", "sms-spam", "instruction-data", "tinyshakespeare", "gpt2-encoder", "gpt2-vocab"}
    assert sources["sms-spam"].member == "SMSSpamCollection"
    assert sources["gpt2-vocab"].mirror_path == "gpt2/vocab.bpe"


def test_a_trickling_server_is_cut_off_and_retried(toy):
    """One byte every 0.2 s never trips a read timeout; the minimum rate does, and a retry succeeds."""
    server, source, out = toy
    server.trickle("toy.txt", every=0.2, times=1)
    speed = SpeedLimits(min_rate=100, window=1.0)
    assert fetch(source, out, mirror=server.url, speed=speed, **FAST).read_bytes() == PAYLOAD
    assert server.requests["toy.txt"] == 2


def test_a_download_past_its_deadline_fails_in_one_line(toy):
    server, source, out = toy
    server.trickle("toy.txt", every=0.2)
    with pytest.raises(GptflowError, match=r"could not download toy .* within 2 s \(not finished within the "
                                           r"download deadline of 2 s\)") as err:
        fetch(source, out, mirror=server.url, speed=SpeedLimits(deadline=2, min_rate=0), retries=5, **FAST)
    assert "\n" not in str(err.value)
    assert os.listdir(out) == []
