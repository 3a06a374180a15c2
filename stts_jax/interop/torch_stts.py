"""STTS at inference in PyTorch: a twin of stts_jax's pruning around transformers' Molmo2ForConditionalGeneration.

Importable without JAX (torch, transformers, numpy, safetensors only): it is the serving side of an export
(`stts_jax.interop.hf_export`), which writes `stts_scorer.safetensors` and `stts_config.json` next to the
Hugging Face weights. `STTSMolmo2.from_pretrained(dir)` loads all three and computes what the JAX model
computes (spec: STTS_SPEC.md §3-7):

  ViT blocks 0..p (transformers' own layers) -> scorer s[f, w] -> per video drop the K lowest windows,
  K = floor(W * ratio * (T - prune_from_frame)) jointly over its frames, first frame kept (ties: the lower
  flat index is dropped first, as jax.lax.top_k on negated scores) -> block p+1 on every token with the key
  bias log(s~) -> blocks p+2.. on the kept tokens of each frame only (frames gathered into padded rows) ->
  adapter on the kept windows -> the LLM on a sequence whose placeholders are regrouped per frame exactly as
  `stts_jax.stts.selection.relayout_vision_tokens` does.

The host reserves W*T - K `<im_patch>` placeholders per video (`placeholder_counts`; `reserve_placeholders`
turns an unpruned Molmo2 prompt into one); every frame's block must end with `<frame_end>`.
`video_token_pooling` lists every window of every frame (W per frame, frame-major), as transformers'
processor returns it. Only videos are pruned; `method='random'` is not reproduced (its draws come from JAX).
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

# host-side counts come from stts_jax.geometry, the one home of these numbers (numpy only: no JAX import)
from stts_jax.geometry import patch_window_index, placeholder_counts, protected_frames, prune_count, window_patch_ids

STTS_CONFIG_FILE = "stts_config.json"
STTS_SCORER_FILE = "stts_scorer.safetensors"
VISION_LAYOUT_TOKENS = ("image_patch_id", "image_col_id", "image_start_id", "low_res_image_start_id",
                        "frame_start_id", "image_end_id", "frame_end_id", "image_low_id")



# ------------------------------------------------------------------------------------------ scorer

class WindowAttention(nn.Module):
    """Multi-head attention with biased q/k/v/o projections (the scorer's window pooling)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, num_heads * head_dim)
        self.k_proj = nn.Linear(dim, num_heads * head_dim)
        self.v_proj = nn.Linear(dim, num_heads * head_dim)
        self.o_proj = nn.Linear(num_heads * head_dim, dim)
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """Returns [B, Lq, D] for query [B, Lq, D], keys [B, Lk, D], key_valid [B, Lk] bool."""
        b, lq, _ = query.shape
        lk = keys.shape[1]
        q = self.q_proj(query).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(keys).view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(keys).view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2) * self.head_dim ** -0.5).float()
        logits = logits.masked_fill(~key_valid[:, None, None, :], torch.finfo(torch.float32).min)
        out = torch.softmax(logits, dim=-1).to(v.dtype) @ v  # [B, H, Lq, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, -1))


class TemporalTokenScorer(nn.Module):
    """s[f, w] in (0, 1): window attention pooling -> concat(previous frame, frame) -> SiLU MLP -> sigmoid."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden: int, grid: int, pool: int):
        super().__init__()
        self.pooling = WindowAttention(dim, num_heads, head_dim)
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)
        ids = window_patch_ids(grid, pool)
        self.register_buffer("window_ids", torch.from_numpy(np.maximum(ids, 0)), persistent=False)
        self.register_buffer("window_valid", torch.from_numpy(ids >= 0), persistent=False)

    def forward(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Returns scores [F, W] float32 for ViT states [F, N, D]; previous [F] = predecessor frame or -1."""
        f = hidden.shape[0]
        w, s = self.window_ids.shape
        valid = self.window_valid
        windows = hidden[:, self.window_ids] * valid[None, :, :, None].to(hidden.dtype)  # [F, W, S, D]
        query = windows.sum(-2) / valid.sum(-1).to(hidden.dtype)[None, :, None]  # [F, W, D]
        d = hidden.shape[-1]
        z = self.pooling(query.reshape(f * w, 1, d), windows.reshape(f * w, s, d),
                         valid[None].expand(f, w, s).reshape(f * w, s))[:, 0].reshape(f, w, d)
        has_prev = (previous >= 0)[:, None, None]
        prev = torch.where(has_prev, z[previous.clamp(min=0)], torch.zeros_like(z))
        u = torch.cat([prev, z], dim=-1)
        h = nn.functional.silu(self.fc2(nn.functional.silu(self.fc1(u))))
        return torch.sigmoid(self.fc3(h)[..., 0].float())


# ----------------------------------------------------------------------------------- pure functions

def previous_frames(frames_per_video: Sequence[int], pairing: str = "per-video") -> torch.Tensor:
    """Returns [F] long: each frame's predecessor (-1 = paired with zeros)."""
    if pairing not in ("per-video", "flat"):
        raise ValueError(f"pairing must be 'per-video' or 'flat', got {pairing!r}")
    prev = torch.arange(sum(frames_per_video)) - 1
    if pairing == "per-video":
        start = 0
        for t in frames_per_video:
            prev[start] = -1
            start += t
    return prev


def select_windows(scores: torch.Tensor, frames_per_video: Sequence[int], ratio: float,
                   prune_from_frame: int = 0) -> torch.Tensor:
    """Returns keep [F, W] bool: per video the K lowest windows (jointly over its frames) dropped, first frame kept.

    Ties drop the lower flat index first (a stable ascending sort = jax.lax.top_k on negated scores).
    """
    f, w = scores.shape
    keep = torch.ones(f, w, dtype=torch.bool, device=scores.device)
    start = 0
    for t in frames_per_video:
        k = prune_count(t, w, ratio, prune_from_frame)
        if k > 0:
            prot = protected_frames(t, prune_from_frame)
            candidates = scores[start + prot: start + t].float().reshape(-1)
            drop = torch.argsort(candidates, stable=True)[:k]
            flat = torch.ones_like(candidates, dtype=torch.bool)
            flat[drop] = False
            keep[start + prot: start + t] = flat.view(t - prot, w)
        start += t
    return keep


def scored_frames(frames_per_video: Sequence[int], w: int, ratio: float, prune_from_frame: int = 0) -> torch.Tensor:
    """Returns [F] bool: frames whose scores bias attention (non-protected frames of videos with K > 0)."""
    mask = torch.zeros(sum(frames_per_video), dtype=torch.bool)
    start = 0
    for t in frames_per_video:
        if prune_count(t, w, ratio, prune_from_frame) > 0:
            mask[start + protected_frames(t, prune_from_frame): start + t] = True
        start += t
    return mask


def rescale_scores(scores: torch.Tensor, active: torch.Tensor, patch_window: torch.Tensor, grid: int,
                   scope: str = "frame", floor: float = math.exp(-2.0)) -> torch.Tensor:
    """Returns s~ [F, N] in [floor, 1]: min-max rescaled per frame (or per grid row); 1 where not active."""
    f = scores.shape[0]
    s = scores.float()[:, patch_window]  # [F, N]
    grouped = s.view(f, grid, grid) if scope == "row" else s.view(f, 1, grid * grid)
    lo = grouped.amin(-1, keepdim=True)
    hi = grouped.amax(-1, keepdim=True)
    rescaled = (floor + (grouped - lo) * (1.0 - floor) / (hi - lo + 1e-6)).view(f, grid * grid)
    return torch.where(active[:, None].to(s.device), rescaled, torch.ones_like(rescaled))


def relayout_vision_tokens(input_ids: torch.Tensor, keep_counts: torch.Tensor, placeholder_id: int,
                           end_marker_ids: Sequence[int]) -> torch.Tensor:
    """Returns input_ids [B, L] with each frame's placeholders regrouped to its kept count (stts/selection.py's rule)."""
    b, length = input_ids.shape
    flat = input_ids.reshape(-1)
    is_placeholder = flat == placeholder_id
    markers = torch.cumsum(torch.isin(flat, torch.tensor(list(end_marker_ids), device=flat.device)).long(), 0)
    kept_before = torch.cat([torch.zeros(1, dtype=torch.long, device=flat.device),
                             torch.cumsum(keep_counts.long().to(flat.device), 0)])
    others = (~is_placeholder).long()
    others_before = torch.cumsum(others, 0) - others
    target = others_before + kept_before[markers.clamp(0, keep_counts.shape[0])]
    out = torch.full_like(flat, placeholder_id)
    out[target[~is_placeholder]] = flat[~is_placeholder]
    return out.view(b, length)


def host_placeholders_per_frame(input_ids: torch.Tensor, placeholder_id: int, end_marker_ids: Sequence[int],
                                num_frames: int) -> list[int]:
    """Returns how many placeholders the host put before each frame's end marker (over the flattened batch)."""
    flat = input_ids.reshape(-1)
    markers = torch.cumsum(torch.isin(flat, torch.tensor(list(end_marker_ids), device=flat.device)).long(), 0)
    frame = markers[flat == placeholder_id]
    return torch.bincount(frame, minlength=num_frames + 1)[: num_frames + 1].tolist()


# ------------------------------------------------------------------------------------------- the twin

class STTSMolmo2(nn.Module):
    """transformers' Molmo2ForConditionalGeneration with STTS token pruning of videos at inference."""

    def __init__(self, hf_model, stts: dict, tokens: dict, scorer: TemporalTokenScorer | None):
        super().__init__()
        self.hf = hf_model
        self.scorer = scorer
        self.stts = dict(stts)
        self.tokens = {k: int(v) for k, v in tokens.items()}
        cfg = hf_model.config
        vis = cfg.vision_config
        self.grid = vis.image_size[0] // vis.patch_size
        self.pool = int(self.stts.get("pool_size", 3))
        self.windows_per_frame = window_patch_ids(self.grid, self.pool).shape[0]
        n = len(hf_model.model.vision_tower.layers)
        self.feature_layers = [l if l >= 0 else n + l for l in cfg.adapter_config.vision_feature_layer]
        self.register_buffer("patch_window", torch.from_numpy(patch_window_index(self.grid, self.pool)),
                             persistent=False)
        self.layout_ids = [self.tokens[name] for name in VISION_LAYOUT_TOKENS if name in self.tokens]
        self.end_marker_ids = (self.tokens["frame_end_id"], self.tokens["image_end_id"])
        if self.stts.get("method", "none") not in ("scorer", "none"):
            raise ValueError(f"stts.method={self.stts['method']!r} is not served by the PyTorch twin ('random' draws "
                             "its windows with JAX; 'evs' is an evaluation baseline): it serves 'scorer' or 'none'")
        if self.stts.get("method") == "scorer" and scorer is None:
            raise ValueError("stts.method='scorer' needs the scorer weights (stts_scorer.safetensors)")

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "STTSMolmo2":
        """Returns the twin of an exported directory (stts files absent: an unpruned model)."""
        from transformers import Molmo2ForConditionalGeneration

        hf = Molmo2ForConditionalGeneration.from_pretrained(path, **kwargs).eval()
        cfg_path = os.path.join(path, STTS_CONFIG_FILE)
        if not os.path.exists(cfg_path):
            c = hf.config
            tokens = dict(image_start_id=c.image_start_token_id, image_end_id=c.image_end_token_id,
                          image_patch_id=c.image_patch_id, low_res_image_start_id=c.low_res_image_start_token_id,
                          frame_start_id=c.frame_start_token_id, frame_end_id=c.frame_end_token_id)
            return cls(hf, dict(method="none"), tokens, None)
        with open(cfg_path) as f:
            extra = json.load(f)
        for key in ("stts", "tokens", "grid", "pool_size", "vit_hidden_size", "vit_num_heads", "vit_head_dim",
                    "vit_mlp_dim"):
            if key not in extra:
                raise ValueError(f"{cfg_path}: field `{key}` is missing")
        stts = dict(extra["stts"], pool_size=extra["pool_size"])
        scorer = None
        if extra.get("has_scorer"):
            from safetensors.torch import load_file

            scorer = TemporalTokenScorer(extra["vit_hidden_size"], extra["vit_num_heads"], extra["vit_head_dim"],
                                         extra["vit_mlp_dim"], extra["grid"], extra["pool_size"])
            state = load_file(os.path.join(path, STTS_SCORER_FILE))
            scorer.load_state_dict(state, strict=True)
            scorer = scorer.to(hf.dtype).eval()
        return cls(hf, stts, extra["tokens"], scorer)

    # ---------------------------------------------------------------- properties
    @property
    def prune_ratio(self) -> float:
        """The pruning ratio in use (settable: e.g. more frames at the same token budget)."""
        return float(self.stts.get("prune_ratio", 0.0))

    @prune_ratio.setter
    def prune_ratio(self, value: float) -> None:
        prune_count(1, 1, value)  # validates
        self.stts["prune_ratio"] = float(value)

    def prunes(self, frames_per_video: Sequence[int]) -> bool:
        """Returns whether any video of this layout loses windows."""
        if self.stts.get("method", "none") == "none":
            return False
        return any(prune_count(t, self.windows_per_frame, self.prune_ratio, self.stts.get("prune_from_frame", 0))
                   for t in frames_per_video)

    def kept_tokens(self, frames_per_video: Sequence[int]) -> list[int]:
        """Returns W*T - K per video (W*T when the twin does not prune)."""
        w = self.windows_per_frame
        if self.stts.get("method", "none") == "none":
            return [w * t for t in frames_per_video]
        return [w * t - prune_count(t, w, self.prune_ratio, self.stts.get("prune_from_frame", 0))
                for t in frames_per_video]

    def reserve_placeholders(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             video_grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input_ids, attention_mask) of an unpruned Molmo2 prompt cut to W*T - K placeholders per video.

        Frame i of a video keeps `placeholder_counts(...)[i]` of its placeholders; rows are re-padded on the
        left (generation-style). Only the per-video totals matter (the forward regroups them).
        """
        frames = [int(t) for t in video_grids[:, 0].tolist()]
        w = self.windows_per_frame
        ratio = self.prune_ratio if self.stts.get("method", "none") != "none" else 0.0
        per_frame = sum((placeholder_counts(t, w, ratio, self.stts.get("prune_from_frame", 0)) for t in frames), [])
        ph = self.tokens["image_patch_id"]
        rows, frame = [], 0
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            out, budget = [], None
            for tok, m in zip(ids, mask):
                if not m:
                    continue
                if tok == ph:
                    budget = per_frame[frame] if budget is None else budget
                    if budget > 0:
                        out.append(tok)
                        budget -= 1
                    continue
                if tok in self.end_marker_ids:
                    frame, budget = frame + 1, None
                out.append(tok)
            rows.append(out)
        length = max(len(r) for r in rows)
        pad = int(self.hf.generation_config.pad_token_id or 0)
        ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids, mask

    # ---------------------------------------------------------------- vision
    def _vit_layer(self, i: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.hf.model.vision_tower.layers[i](x, mask)

    def encode_video(self, pixel_values_videos: torch.Tensor, video_token_pooling: torch.Tensor,
                     video_grids: torch.Tensor) -> dict:
        """Returns dict(features [T_kept, H_llm], keep [F, W] bool or None, scores [F, W] or None)."""
        frames = [int(t) for t in video_grids[:, 0].tolist()]
        vt = self.hf.model.vision_tower
        dtype = vt.patch_embedding.weight.dtype
        pix = pixel_values_videos.to(dtype)
        f, n = pix.shape[:2]
        w = self.windows_per_frame
        if f != sum(frames):
            raise ValueError(f"pixel_values_videos holds {f} frames, video_grids describe {sum(frames)}")
        if video_token_pooling.shape[0] != f * w:
            raise ValueError(f"video_token_pooling must list every window of every frame: {f * w} rows, "
                             f"got {video_token_pooling.shape[0]}")
        if not self.prunes(frames):
            feats = self.hf.model.get_video_features(pix, video_token_pooling, video_grids).pooler_output
            return dict(features=torch.cat(feats), keep=None, scores=None)
        st = self.stts
        p = int(st["prune_at"])
        ratio, pff = self.prune_ratio, int(st.get("prune_from_frame", 0))
        num_blocks = max(max(self.feature_layers), p + 1) + 1
        hidden = {}
        x = vt.patch_embedding(pix) + vt.positional_embedding[None].to(dtype)
        for i in range(p + 1):
            x = self._vit_layer(i, x, None)
            hidden[i] = x
        scores = self.scorer(x, previous_frames(frames, st.get("pairing", "per-video")).to(x.device))
        keep = select_windows(scores, frames, ratio, pff)
        keep_patch = keep[:, self.patch_window]  # [F, N]
        bias = None
        if st.get("score_bias", True):
            active = scored_frames(frames, w, ratio, pff)
            rescaled = rescale_scores(scores, active, self.patch_window, self.grid, st.get("rescale_scope", "frame"),
                                      float(st.get("bias_floor", math.exp(-2.0))))
            bias = torch.log(rescaled).to(dtype)[:, None, None, :].expand(f, 1, n, n)
        x = self._vit_layer(p + 1, x, bias)
        hidden[p + 1] = x
        later = list(range(p + 2, num_blocks))
        hidden.update(self._kept_token_blocks(x, keep_patch, later))
        feats = torch.cat([hidden[l] for l in self.feature_layers], dim=-1)
        feats = feats * keep_patch[..., None].to(feats.dtype)
        rows = torch.nonzero(keep.reshape(-1)).squeeze(-1)
        pooled = self.hf.model.multi_modal_projector(feats, video_token_pooling[rows]).last_hidden_state
        return dict(features=pooled, keep=keep, scores=scores)

    def _kept_token_blocks(self, x: torch.Tensor, keep_patch: torch.Tensor, later: list[int]) -> dict:
        """Returns {block: [F, N, D]} for blocks `later`, each frame attending only over its own kept tokens.

        Whole frames run as they are; partly kept frames are gathered into rows padded to the longest of them
        (key padding masked); frames that keep nothing are skipped. Pruned positions are zero.
        """
        out = {i: torch.zeros_like(x) for i in later}
        if not later:
            return out
        f, n, _ = x.shape
        counts = keep_patch.sum(-1)
        groups = [torch.nonzero(counts == n).squeeze(-1), torch.nonzero((counts > 0) & (counts < n)).squeeze(-1)]
        for frames in groups:
            if frames.numel() == 0:
                continue
            c = counts[frames]
            length = int(c.max())
            order = torch.argsort((~keep_patch[frames]).to(torch.int8), dim=-1, stable=True)[:, :length]  # kept first
            valid = torch.arange(length, device=x.device)[None] < c[:, None]  # [G, length]
            h = torch.gather(x[frames], 1, order[..., None].expand(-1, -1, x.shape[-1]))
            mask = None
            if not bool(valid.all()):
                mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
                mask = mask.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :].expand(-1, 1, length, length)
            rows = frames[:, None].expand(-1, length)[valid]
            cols = order[valid]
            for i in later:
                h = self._vit_layer(i, h, mask)
                out[i][rows, cols] = h[valid]
        return out

    # ---------------------------------------------------------------- LLM inputs
    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       pixel_values_videos: torch.Tensor, video_token_pooling: torch.Tensor,
                       video_grids: torch.Tensor) -> tuple[dict, dict]:
        """Returns (kwargs for the transformers model's forward/generate, vision dict of encode_video)."""
        frames = [int(t) for t in video_grids[:, 0].tolist()]
        ph = self.tokens["image_patch_id"]
        host = host_placeholders_per_frame(input_ids, ph, self.end_marker_ids, sum(frames))
        if host[-1]:
            raise ValueError(f"{host[-1]} <im_patch> placeholders follow the last <frame_end>; every frame's "
                             f"placeholders must end with <frame_end>")
        want = self.kept_tokens(frames)
        start = 0
        for v, (t, k) in enumerate(zip(frames, want)):
            got = sum(host[start: start + t])
            if got != k:
                raise ValueError(f"video {v} ({t} frames) has {got} <im_patch> placeholders; at ratio "
                                 f"{self.prune_ratio if self.prunes(frames) else 0.0} it keeps {k} (W*T - K); "
                                 f"use reserve_placeholders()")
            start += t
        vision = self.encode_video(pixel_values_videos, video_token_pooling, video_grids)
        if vision["keep"] is not None:
            input_ids = relayout_vision_tokens(input_ids, vision["keep"].sum(-1), ph, self.end_marker_ids)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        mm = torch.isin(input_ids, torch.tensor(self.layout_ids, device=input_ids.device)).long()
        kwargs = dict(input_ids=input_ids, mm_token_type_ids=mm,
                      mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=(vision["features"],))})
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs, vision

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, pixel_values_videos=None, video_token_pooling=None,
                video_grids=None, **kwargs):
        """Returns transformers' output (logits, ...) with `keep` [F, W] and `scores` attached."""
        if pixel_values_videos is None:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        inputs, vision = self.prepare_inputs(input_ids, attention_mask, pixel_values_videos, video_token_pooling,
                                             video_grids)
        out = self.hf(**inputs, **kwargs)
        out["keep"], out["scores"], out["input_ids"] = vision["keep"], vision["scores"], inputs["input_ids"]
        return out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values_videos=None, video_token_pooling=None,
                 video_grids=None, **kwargs):
        """Returns transformers' generate output for a pruned video prompt (the pruned features are the prefill's)."""
        if pixel_values_videos is None:
            return self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        inputs, _ = self.prepare_inputs(input_ids, attention_mask, pixel_values_videos, video_token_pooling,
                                        video_grids)
        return self.hf.generate(**inputs, **kwargs)
