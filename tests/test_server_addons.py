"""The add-on routes over HTTP: A1111's shapes, the folders given at start-up only, the guard's rules."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("fastapi")

from test_addons_pipeline import kohya_lora  # noqa: E402
from test_server import Running  # noqa: E402

from diffuse.server.state import ServerSettings  # noqa: E402


@pytest.fixture(scope="module")
def running(tmp_path_factory, reference_folders, reference_pipes):
    root = tmp_path_factory.mktemp("server_addons")
    loras, embeddings = root / "loras", root / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    save_file(kohya_lora(reference_pipes["sd1"]), loras / "detail.safetensors", {"ss_output_name": "fine"})
    save_file({"emb_params": torch.randn(3, 32)}, embeddings / "shiny.safetensors")
    save_file({"emb_params": torch.randn(1, 7)}, embeddings / "narrow.safetensors")
    settings = ServerSettings(
        model=reference_folders["sd1"], dtype="float32", lora_dirs=(loras,), embedding_dirs=(embeddings,)
    )
    server = Running(settings)
    yield server, loras
    server.stop()


def test_loras_are_listed_in_a1111s_shape_and_refreshed(running):
    server, loras = running
    status, body, _ = server.call("GET", "/sdapi/v1/loras")
    assert status == 200
    assert [(e["name"], e["alias"], e["path"], e["metadata"]) for e in body] == [
        ("detail", "fine", str(loras / "detail.safetensors"), {"ss_output_name": "fine"})
    ]
    (loras / "detail.safetensors").rename(loras / "other.safetensors")
    status, body, _ = server.call("POST", "/sdapi/v1/refresh-loras", {})
    assert (status, body) == (200, None)
    assert [e["name"] for e in server.call("GET", "/sdapi/v1/loras")[1]] == ["other"]


def test_embeddings_are_listed_loaded_and_skipped(running):
    server, _ = running
    status, body, _ = server.call("GET", "/sdapi/v1/embeddings")
    assert status == 200
    assert body["loaded"] == {
        "shiny": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 3}
    }
    assert list(body["skipped"]) == ["narrow"] and "7 wide" in body["skipped"]["narrow"]["reason"]


def test_an_unknown_lora_is_refused_before_the_queue(running):
    server, _ = running
    status, body, _ = server.call("POST", "/sdapi/v1/txt2img", {"prompt": "a cat <lora:nope:1>", "steps": 1})
    assert status == 422 and "unknown LoRA 'nope'" in body["detail"]


def test_refresh_from_another_origin_is_refused(running):
    server, _ = running
    status, _, _ = server.call("POST", "/sdapi/v1/refresh-loras", {}, headers={"Origin": "http://evil.example"})
    assert status == 403
