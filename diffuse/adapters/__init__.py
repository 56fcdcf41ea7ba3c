"""Add-ons: LoRA / LyCORIS files merged into a pipeline's weights and restored exactly.

Public API:

    read_lora(path: str | Path) -> Lora
        Any supported file (.safetensors, .pt, .ckpt; the bytes decide, pickles read weights-only,
        non-finite tensors refused): kohya / A1111 (`lora_unet_*` in diffusers or LDM names,
        `lora_te_*`, SDXL's `lora_te1_*` / `lora_te2_*`; LoCon convolutions, Tucker `lora_mid`, per-module `scale`), LyCORIS LoHa,
        LoKr, Full and DoRA `dora_scale`, diffusers / PEFT (`unet.…lora_A.weight`, the older
        `to_q_lora` / `lora_linear_layer` names, SDXL's `text_encoder_2.`; alpha from
        `lora_adapter_metadata`).
    lora_from_state_dict(state, name, metadata=None, path=None, short_hash="") -> Lora
        The same for tensors in memory.
    Lora: name (file stem), alias (`ss_output_name` or the stem), path, short_hash (12 hex as
        A1111's `Lora hashes`), metadata (the safetensors `__metadata__`), patches (one per module),
        bundled_embeddings (`bundle_emb.*` tensors, untouched), base ("SD 1.x" / "SD 2.x" / "SDXL"
        when the metadata says).
    LoraMerge(networks: Mapping[str, nn.Module], spill_above: int = SPILL_ABOVE)
        networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, plus
        "text_encoder_2": pipe.text_encoder_2 for SDXL (prepared or plain, float32 or bfloat16).
        A LoRA made for another base is refused with the reason: its metadata, a second text
        encoder's keys on SD 1/2, or SD 1/2's single `lora_te_` encoder on SDXL.
        .apply([(lora, te_weight, unet_weight), ...]) checks everything, then merges in place;
            the same selection again is a no-op, another one restores first, [] restores.
        .restore() puts every touched weight back bit for bit.
        .applied: the (lora, te_weight, unet_weight) tuples merged now.
        .check(selection) raises LoraError as apply would, changing nothing.
    LoraError (a CheckpointError): one line naming the file and what was wrong.
"""

from diffuse.adapters.lora import Lora, LoraError, lora_from_state_dict, read_lora
from diffuse.adapters.merge import SPILL_ABOVE, LoraMerge

__all__ = ["SPILL_ABOVE", "Lora", "LoraError", "LoraMerge", "lora_from_state_dict", "read_lora"]
