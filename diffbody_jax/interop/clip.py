"""Mapping tables of transformers' CLIP text and vision models <-> `diffbody_jax.models.clip`.

Exports use the hub layout (`text_model.` / `vision_model.` prefixes), which transformers 4.x and 5.x
both load; imports also accept the unprefixed keys that transformers 5 writes for a bare CLIPTextModel
or CLIPVisionModel.
"""

from __future__ import annotations

from diffbody_jax.interop.mapping import CONV_OIHW_TO_HWIO, MappingTable, Rule, import_only, linear, nest, norm
from diffbody_jax.models.clip import CLIPTextConfig, CLIPVisionConfig


def encoder_layer_rules() -> list[Rule]:
    rows = []
    for ours, theirs in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out_0", "out_proj")):
        rows += linear(f"self_attn.{theirs}", f"self_attn/{ours}")
    rows += norm("layer_norm1", "layer_norm1") + norm("layer_norm2", "layer_norm2")
    rows += linear("mlp.fc1", "mlp/fc1") + linear("mlp.fc2", "mlp/fc2")
    return nest("encoder.layers.*", "encoder/layers_*", rows)


def _with_prefix(prefix: str, rows: list[Rule]) -> list[Rule]:
    """Write the hub's prefixed keys; also read the unprefixed ones."""
    return nest(prefix, "", rows) + import_only(rows)


def clip_text_table(config: CLIPTextConfig) -> MappingTable:
    rows = [
        Rule("embeddings.token_embedding.weight", "embeddings/token_embedding/embedding"),
        Rule("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding"),
    ]
    rows += encoder_layer_rules() + norm("final_layer_norm", "final_layer_norm")
    rows = _with_prefix("text_model", rows)
    if config.with_projection:
        rows += linear("text_projection", "text_projection", bias=False)
    return MappingTable(rows, skip=[r"position_ids$"])


def clip_vision_table(config: CLIPVisionConfig) -> MappingTable:
    rows = [
        Rule("embeddings.class_embedding", "embeddings/class_embedding"),
        Rule("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", CONV_OIHW_TO_HWIO),
        Rule("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding"),
    ]
    rows += norm("pre_layrnorm", "pre_layrnorm") + encoder_layer_rules() + norm("post_layernorm", "post_layernorm")
    rows = _with_prefix("vision_model", rows)
    if config.with_projection:
        rows += linear("visual_projection", "visual_projection", bias=False)
    return MappingTable(rows, skip=[r"position_ids$"])
