"""The mapping-table mechanics: patterns, transforms, coverage errors."""

import numpy as np
import pytest

from diffbody_jax.interop.mapping import (
    CONV_OIHW_TO_HWIO,
    LINEAR_T,
    ConversionError,
    MappingTable,
    Rule,
    conv2d,
    flax_to_torch,
    linear,
    nest,
    plan_import,
    torch_to_flax,
)


def test_indices_move_in_order_both_ways():
    table = MappingTable(nest("blocks.*.layers.*", "blocks_*/layers_*", conv2d("conv", "conv")))
    assert table.flax_path("blocks.12.layers.3.conv.weight") == ("blocks_12/layers_3/conv/kernel", CONV_OIHW_TO_HWIO)
    assert table.torch_key("blocks_12/layers_3/conv/bias")[0] == "blocks.12.layers.3.conv.bias"
    assert table.flax_path("blocks.x.layers.3.conv.weight") is None  # `*` is digits only
    assert table.flax_path("prefix.blocks.1.layers.3.conv.weight") is None  # anchored


def test_first_rule_wins_and_variant_tables_layer_on_top():
    base = MappingTable(linear("proj", "proj"))
    variant = MappingTable([Rule("proj.weight", "proj_variant/kernel", LINEAR_T)])
    assert (base + variant).flax_path("proj.weight")[0] == "proj_variant/kernel"
    assert (base + variant).flax_path("proj.bias")[0] == "proj/bias"


@pytest.mark.parametrize("transform_shape", [((5, 3), "linear"), ((6, 4, 3, 2), "conv")])
def test_transforms_invert(transform_shape, rng):
    shape, kind = transform_shape
    t = LINEAR_T if kind == "linear" else CONV_OIHW_TO_HWIO
    x = rng.standard_normal(shape).astype(np.float32)
    assert t.to_flax(x).shape == t.flax_shape(shape)
    assert t.torch_shape(t.flax_shape(shape)) == shape
    np.testing.assert_array_equal(t.to_torch(t.to_flax(x)), x)


def test_rule_index_counts_must_agree():
    with pytest.raises(ValueError, match="index counts differ"):
        Rule("a.*.b", "a/b")


def test_one_error_lists_every_problem():
    table = MappingTable(linear("fc", "fc") + conv2d("conv", "conv"), skip=[r"^num_batches_tracked$"])
    flax_shapes = {"fc/kernel": (3, 5), "fc/bias": (5,), "conv/kernel": (3, 3, 2, 4), "conv/bias": (4,)}
    torch_shapes = {"fc.weight": (5, 4), "fc.bias": (5,), "conv.weight": (4, 2, 3, 3), "extra.weight": (1,),
                    "num_batches_tracked": ()}
    with pytest.raises(ConversionError) as info:
        plan_import(torch_shapes, flax_shapes, table, "model.safetensors")
    err = info.value
    msg = str(err)
    assert msg.startswith("model.safetensors:")
    assert err.unexpected == ["extra.weight"]
    assert err.missing == ["conv/bias"]
    assert err.misshapen == [("fc.weight", (5, 4), "fc/kernel", (3, 5))]
    assert "fc.weight (5, 4) -> fc/kernel (3, 5)" in msg and "conv/bias" in msg and "extra.weight" in msg


def test_round_trip_on_a_small_table(rng):
    table = MappingTable(nest("layers.*", "layers_*", linear("fc", "fc") + conv2d("conv", "conv")))
    sd = {}
    for i in range(3):
        sd[f"layers.{i}.fc.weight"] = rng.standard_normal((4, 3)).astype(np.float32)
        sd[f"layers.{i}.fc.bias"] = rng.standard_normal(4).astype(np.float32)
        sd[f"layers.{i}.conv.weight"] = rng.standard_normal((5, 2, 3, 1)).astype(np.float16)
        sd[f"layers.{i}.conv.bias"] = rng.standard_normal(5).astype(np.float16)
    expected = {f"layers_{i}": {"fc": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)},
                                "conv": {"kernel": np.zeros((3, 1, 2, 5)), "bias": np.zeros(5)}} for i in range(3)}
    params = torch_to_flax(sd, table, expected)
    back = flax_to_torch(params, table)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(back[k], sd[k])


def test_export_names_unmapped_params():
    with pytest.raises(ConversionError, match="stray/kernel"):
        flax_to_torch({"stray": {"kernel": np.zeros((2, 2))}}, MappingTable(linear("fc", "fc")))
