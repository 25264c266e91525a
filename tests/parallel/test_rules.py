"""The logical sharding rules are a config field (mesh.logical_rules) over the default table; bad entries are named."""

import ml_collections
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from diffbody_jax.config import load_config
from diffbody_jax.parallel.sharding import LOGICAL_RULES, ShardingRules, leaf_spec

MESH = AbstractMesh((1, 1, 4), ("data", "fsdp", "tensor"))  # shapes only: no devices needed


def test_the_default_table_and_an_override_place_heads():
    default = ShardingRules.from_config(load_config("swinir:variant=tiny-diffbir").mesh)
    assert default.logical == LOGICAL_RULES
    assert leaf_spec((64, 128), ("embed", "heads"), MESH, default) == P(None, "tensor")
    section = ml_collections.ConfigDict({"fsdp_min_size": 2**18, "logical_rules": {"heads": None,
                                                                                    "embed": "tensor"}})
    rules = ShardingRules.from_config(section)
    assert leaf_spec((64, 128), ("embed", "heads"), MESH, rules) == P("tensor", None)
    assert dict(rules.logical)["mlp"] == "tensor"  # entries not overridden keep the table's value


def test_bad_entries_are_named():
    with pytest.raises(ValueError, match=r"unknown logical axes \['head'\]"):
        ShardingRules.from_config({"fsdp_min_size": 1, "logical_rules": {"head": None}})
    with pytest.raises(ValueError, match=r"mesh.logical_rules\['mlp'\] = 'model'"):
        ShardingRules.from_config({"fsdp_min_size": 1, "logical_rules": {"mlp": "model"}})
