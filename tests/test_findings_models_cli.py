"""`cmrvl models upload` and object-store media for the VLM, against the real local object store."""

from __future__ import annotations

import hashlib
import urllib.request
import uuid

import pytest

from services.cli import main
from services.findings.pipeline import build_messages, object_store_items
from tests.vlm_fixtures import tiny_qwen25_vl


@pytest.fixture()
def s3_env(stack_info, monkeypatch):
    monkeypatch.setenv("CMRVL_S3_ENDPOINT", stack_info.s3_endpoint)
    monkeypatch.setenv("CMRVL_S3_ACCESS_KEY", stack_info.access_key)
    monkeypatch.setenv("CMRVL_S3_SECRET_KEY", stack_info.secret_key)


def test_upload_puts_the_model_folder_in_the_storage_uri_layout(s3_env, store, capsys, tmp_path):
    model_dir = tiny_qwen25_vl()
    version = f"t{uuid.uuid4().hex[:8]}"
    assert main(["models", "upload", str(model_dir), "--name", "cmr-vl-tiny", "--version", version]) == 0
    out = capsys.readouterr().out
    bucket, prefix = store.bucket("models"), f"vlm/cmr-vl-tiny/{version}/"
    assert f'"storage_uri": "s3://{bucket}/{prefix.rstrip("/")}"' in out

    local = {p.relative_to(model_dir).as_posix(): p for p in model_dir.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    assert sorted(k[len(prefix):] for k in store.list_keys(bucket, prefix)) == sorted(local)
    # What KServe's storage initializer does with storageUri: copy the prefix to a folder.
    copied = tmp_path / "mnt-models"
    store.download_prefix(bucket, prefix, copied)
    for rel, path in local.items():
        assert (copied / rel).read_bytes() == path.read_bytes(), rel
    manifest = store.get_json(bucket, f"vlm/cmr-vl-tiny/{version}.manifest.json")
    weights = (model_dir / "model.safetensors").read_bytes()
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()

    # versions are immutable unless asked
    assert main(["models", "upload", str(model_dir), "--name", "cmr-vl-tiny", "--version", version]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["models", "upload", str(model_dir), "--name", "cmr-vl-tiny", "--version", version,
                 "--overwrite"]) == 0


def test_upload_refuses_bad_arguments(s3_env, tmp_path, capsys):
    assert main(["models", "upload", str(tmp_path), "--name", "x", "--version", "1"]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert main(["models", "upload", "--name", "x", "--version", "1"]) == 1
    assert "LOCAL_DIR or --from-hub" in capsys.readouterr().err
    assert main(["models", "upload", str(tmp_path), "--name", "../x", "--version", "1"]) == 1


def test_from_hub_without_internet_is_a_clear_error(s3_env, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without internet amounts to
    assert main(["models", "upload", "--from-hub", "Qwen/Qwen2.5-VL-7B-Instruct", "--name", "x",
                 "--version", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot download 'Qwen/Qwen2.5-VL-7B-Instruct'" in err and "LOCAL_DIR" in err


def test_object_store_media_inline_or_presigned(store):
    bucket, key = store.bucket("artifacts"), f"test-{uuid.uuid4().hex[:8]}/findings/wall_motion.mp4"
    store.ensure_buckets()
    store.put_bytes(bucket, key, b"\x00\x00\x00\x18ftypmp42 not really a video", "video/mp4")
    (inline,) = object_store_items(store, bucket, [(key, "video/mp4")], mode="data")
    (presigned,) = object_store_items(store, bucket, [(key, "video/mp4")], mode="presigned")
    assert inline[0].startswith(b"\x00\x00\x00\x18ftyp")
    assert presigned[0].startswith("http") and presigned[1] == "video/mp4"
    with urllib.request.urlopen(presigned[0], timeout=10) as response:  # what the model server does
        assert response.read() == inline[0]
    # a presigned URL goes into the request as is; bytes become a data URL
    part = build_messages("wall_motion", [presigned])[0]["content"][0]
    assert part == {"type": "video_url", "video_url": {"url": presigned[0]}}
    assert build_messages("wall_motion", [inline])[0]["content"][0]["video_url"]["url"].startswith(
        "data:video/mp4;base64,")
    with pytest.raises(ValueError):
        object_store_items(store, bucket, [(key, "video/mp4")], mode="ftp")
