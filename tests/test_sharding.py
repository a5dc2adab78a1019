"""Parameters carry logical axis annotations that map onto a (data, fsdp) mesh."""

from __future__ import annotations

import jax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from magnet_jax import sharding
from magnet_jax.models import abstract_params, build_model
from magnet_jax.models.presets import tiny_model_config


@pytest.fixture(scope="module")
def boxed_params():
    return abstract_params(build_model(tiny_model_config(64)), 64, boxed=True)


def test_fsdp_mesh_shards_kernels_rows_and_replicates_norms(boxed_params):
    mesh = sharding.make_mesh(num_data=4, num_fsdp=2)
    specs = traverse_util.flatten_dict(
        jax.tree.map(lambda s: s.spec, sharding.logical_shardings(boxed_params, mesh)), sep="/")
    assert specs["image_model/layers_0/blocks_0/mlp/fc1/kernel"] == P("fsdp", None)
    assert specs["language_model/encoder/layer_0/attention/self/query/kernel"] == P("fsdp", None)
    assert specs["predictor/ffn_0/linear1/kernel"] == P("fsdp", None)
    assert specs["image_model/layers_0/blocks_0/norm1/scale"] == P()
    # Every parameter gets a spec; only weight matrices are sharded, and a good share of them.
    sharded = [k for k, v in specs.items() if any(a is not None for a in v)]
    assert len(specs) == len(traverse_util.flatten_dict(boxed_params))
    assert all(k.endswith("kernel") or k.endswith("embedding") for k in sharded)
    assert len(sharded) > 0.3 * len(specs)


def test_data_parallel_mesh_replicates_everything(boxed_params):
    mesh = sharding.make_mesh(num_data=-1, num_fsdp=1)
    assert mesh.shape == {"data": 8, "fsdp": 1}
    shardings = jax.tree.leaves(sharding.logical_shardings(boxed_params, mesh))
    # fsdp has size 1: a spec may name it, but no tensor is actually split.
    assert all(s.shard_shape(s_shape) == s_shape
               for s, s_shape in ((s, (32,) * len(s.spec)) for s in shardings))


def test_bad_mesh_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="3 does not divide the 8 devices"):
        sharding.make_mesh(num_data=-1, num_fsdp=3)
    with pytest.raises(ValueError, match="2×2 != 8 devices"):
        sharding.make_mesh(num_data=2, num_fsdp=2)
