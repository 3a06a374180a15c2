"""transformers' Molmo2 as the numerical oracle: tiny random configs, checkpoints, matching inputs."""

from __future__ import annotations

import numpy as np
import torch

TINY_TOKENS = dict(image_start_token_id=100, image_end_token_id=101, image_patch_id=102,
                   low_res_image_start_token_id=104, frame_start_token_id=107, frame_end_token_id=108)
LAYOUT_IDS = (100, 101, 102, 103, 104, 106, 107, 108)  # the 8 tokens with mm_token_type 1


def tiny_hf_model(seed: int = 0, *, rope_type: str = "default", rope_scaling_layers=None, vision_layers=(-1, -2),
                  vit_layers: int = 3):
    """Returns a tiny random Molmo2ForConditionalGeneration with every norm weight and bias perturbed."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    torch.manual_seed(seed)
    rope = {"rope_type": rope_type, "rope_theta": 10000.0}
    if rope_type == "linear":
        rope["factor"] = 2.0
    text = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                additional_vocab_size=16, num_hidden_layers=2, intermediate_size=96, rope_parameters=rope)
    if rope_scaling_layers is not None:
        text["rope_scaling_layers"] = list(rope_scaling_layers)
    cfg = Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vit_layers, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, image_size=[126, 126]),
        adapter_config=dict(vision_feature_layer=list(vision_layers), hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=16, intermediate_size=48, text_hidden_size=64),
        text_config=text, **TINY_TOKENS,
    )
    model = Molmo2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layernorm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif p.ndim == 2:
                p.mul_(3.0)  # default init gives near-uniform logits; make them decisive
    return model


def video_example(rng: np.random.Generator, num_frames: int, tokens_per_frame: int, question_len: int) -> list[int]:
    """Returns input ids: bos, per frame `timestamp, <frame_start>, <im_patch> x k, <frame_end>`, question."""
    ids = [rng.integers(0, 100)]
    for _ in range(num_frames):
        ids += list(rng.integers(0, 100, size=2)) + [107] + [102] * tokens_per_frame + [108]
    return ids + list(rng.integers(0, 100, size=question_len))


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray,
              pooling: np.ndarray, grids: np.ndarray, output_hidden_states: bool = False):
    """Returns transformers' logits (and the vision tower output) for padded inputs."""
    ids = torch.from_numpy(input_ids.astype(np.int64))
    mm = torch.from_numpy(np.isin(input_ids, LAYOUT_IDS).astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
                    mm_token_type_ids=mm, pixel_values_videos=torch.from_numpy(pixel_values),
                    video_token_pooling=torch.from_numpy(pooling.astype(np.int64)),
                    video_grids=torch.from_numpy(grids.astype(np.int64)))
        vision = model.model.vision_tower(torch.from_numpy(pixel_values), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in vision.hidden_states]
