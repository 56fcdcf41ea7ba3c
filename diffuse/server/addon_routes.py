"""A1111's add-on routes: the LoRAs and embeddings in the folders given at start-up.

    GET  /sdapi/v1/loras          [{name, alias, path, metadata}]
    POST /sdapi/v1/refresh-loras  null (the folders looked at again)
    GET  /sdapi/v1/embeddings     {"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}},
                                   "skipped": {...}}

Only those folders are ever read; a request never names a path (prompts name add-ons by name,
looked up in these lists). The refresh changes state, so it is a POST the guard holds to the
same rules as every other (Origin and Host, JSON bodies).
"""

from __future__ import annotations

from fastapi import FastAPI

from diffuse.adapters.embeddings import Embedding
from diffuse.server.state import Server


def add_addon_routes(app: FastAPI, server: Server) -> None:
    @app.get("/sdapi/v1/loras", tags=["A1111"])
    def loras() -> list[dict]:
        return [entry.api_entry() for entry in server.host.pipe.loras()]

    @app.post("/sdapi/v1/refresh-loras", tags=["A1111"])
    def refresh_loras() -> None:
        server.host.pipe.refresh_addons()

    @app.get("/sdapi/v1/embeddings", tags=["A1111"])
    def embeddings() -> dict:
        loaded, skipped = server.host.pipe.embeddings()
        return {
            "loaded": {name: embedding_entry(embedding) for name, embedding in loaded.items()},
            # A1111 describes a skipped file as a loaded one; diffuse has not kept it, so it says why instead.
            "skipped": {name: {**dict.fromkeys(_FIELDS), "reason": reason} for name, reason in skipped.items()},
        }


_FIELDS = ("step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors")


def embedding_entry(embedding: Embedding) -> dict:
    """A1111's entry: the training step and checkpoint as recorded, the vectors' width and count."""
    return {
        "step": embedding.step,
        "sd_checkpoint": embedding.sd_checkpoint,
        "sd_checkpoint_name": embedding.sd_checkpoint_name,
        "shape": int(embedding.vectors.shape[-1]),
        "vectors": int(embedding.vectors.shape[0]),
    }
