"""Every Swin size and window of the presets builds a model of the expected shapes."""

from __future__ import annotations

import jax
import pytest

from magnet_jax.models import abstract_params, build_model, dummy_inputs
from magnet_jax.models.presets import SWIN_SIZES, swin_model_config


@pytest.mark.parametrize("size,window,image", [("tiny", 7, 224), ("small", 12, 384),
                                                ("large", 12, 384)])
def test_swin_sizes_build(size, window, image):
    cfg = swin_model_config(size, window_size=window, image_size=image)
    model = build_model(cfg)
    params = abstract_params(model, image)
    embed, depths, heads = SWIN_SIZES[size]
    stage3 = params["image_model"]["layers_2"]
    assert len([k for k in stage3 if k.startswith("blocks_")]) == depths[2]
    table = stage3["blocks_0"]["attn"]["relative_position_bias_table"]
    assert table.shape == ((2 * window - 1) ** 2, heads[2])
    assert params["image_model"]["patch_embed"]["proj"]["kernel"].shape == (4, 4, 3, embed)
    out = jax.eval_shape(lambda p, *x: model.apply({"params": p}, *x), params, *dummy_inputs(image))
    assert out["pred_masks"].shape == (1, 1, image // 4, image // 4)


def test_unknown_swin_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown Swin size 'huge'"):
        swin_model_config("huge")
