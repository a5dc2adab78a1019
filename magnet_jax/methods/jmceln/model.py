"""JMCELN on the MagNet trunk (training_objectives.md §7.2, a reconstruction): the interleaved
Swin/BERT encoder and the deformable pixel decoder of MagNet, with the Mask2Former decoder
replaced by the contextual-embedding cascade with progressive alignment (decoder.py).

The trunk keeps MagNet's parameter names (`image_model`, `language_model`, `pixel_decoder`),
so Swin and BERT checkpoints and the optimiser groups apply unchanged; the decoder lives under
`context_decoder`.
"""

from __future__ import annotations

from magnet_jax.methods.jmceln.decoder import ContextualEmbeddingDecoder
from magnet_jax.models.magnet import MagNet


class JMCELN(MagNet):
    """image (B, H, W, 3), ids (B, N), att (B, N) ->
    dict(pred_masks (B, 1, H/4, W/4) the last stage's mask logits after PAN,
         aux_outputs [dict(pred_masks) of the earlier stages], raw_masks [every stage before PAN]).
    """
    context_decoder_kwargs: dict = None

    def setup(self):
        self.setup_trunk()
        self.context_decoder = ContextualEmbeddingDecoder(**(self.context_decoder_kwargs or {}),
                                                          dtype=self.dtype)

    def __call__(self, image, ids, att, train: bool = False, return_intermediates: bool = False,
                 masked_ids=None):
        if masked_ids is not None:
            raise ValueError("JMCELN has no Mask Grounding pass (masked_ids)")
        features, extra = self.encode(image, ids, att, train, return_intermediates=True)
        mask_features, memories = self.pixel_decoder(features)
        stages = self.context_decoder(memories, mask_features, extra["text_final"], att)
        outputs = dict(pred_masks=stages[-1]["pred_masks"],
                       aux_outputs=[dict(pred_masks=s["pred_masks"]) for s in stages[:-1]],
                       raw_masks=[s["raw_masks"] for s in stages])
        if return_intermediates:
            outputs["intermediates"] = dict(extra, features=features, mask_features=mask_features)
        return outputs
