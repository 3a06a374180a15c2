"""One video, one question, one checkpoint: the library behind `launch/predict.py` (a thin absl wrapper).

The prompt is the training pipeline's own (`Molmo2TextEncoder`: Molmo2's chat layout, timestamps, each frame's
placeholders, special-token text in the question refused), the checkpoint comes through the one loader
(`params_io.load_checkpoint`: Hugging Face directory, params checkpoint or training workdir) and the answer
through the KV-cache Generator: with options, the most probable option letter at the answer position (the
evaluator's letter ids); without, greedy generation.

Tokenizer: the checkpoint's tokenizer.json (or `tokenizer=`). Without one (tiny random test models) a word-level
tokenizer over the prompt's own words is built at the model's special-token ids (`build_word_tokenizer`): the
printed text is then meaningless, the numbers are still the model's.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from stts_jax import paths


class PredictError(ValueError):
    """predict cannot run; the message says why and what to do."""


@dataclasses.dataclass
class Prediction:
    """What predict found."""
    answer: str
    option_probs: dict | None
    vision_tokens_kept: int
    vision_tokens_total: int
    frames: int
    frame_indices: list
    prune_ratio: float
    seconds_total: float
    seconds_model: float
    tokenizer: str
    logits: np.ndarray | None = None  # [vocab] at the answer position
    keep: np.ndarray | None = None  # [T, W]


def uses_frame_special_tokens(checkpoint: str) -> bool:
    """Returns the processor's `use_frame_special_tokens` (False: <im_start>/<im_end> delimit frames), default True."""
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        path = paths.as_path(paths.join(checkpoint, name))
        if path.exists():
            value = json.loads(path.read_text()).get("use_frame_special_tokens")
            if value is not None:
                return bool(value)
    return True


def prompt_tokenizer(checkpoint: str, tokenizer: str | None, cfg, texts):
    """Returns (tokenizers.Tokenizer, description): `tokenizer`, else the checkpoint's tokenizer.json, else a word
    tokenizer over `texts` at the model's special-token ids ("toy")."""
    from stts_jax.data.tokenizer import build_word_tokenizer, load_tokenizer, words_of

    path = tokenizer or paths.join(checkpoint, "tokenizer.json")
    if tokenizer and not paths.as_path(path).exists():
        raise PredictError(f"--tokenizer {path} does not exist")
    if paths.as_path(path).exists():
        return load_tokenizer(path), path
    from absl import logging

    logging.warning("no tokenizer.json in %s: using a word tokenizer built from the prompt (text output is "
                    "meaningless)", checkpoint)
    try:
        return build_word_tokenizer(words_of(texts), cfg.tokens, vocab_size=cfg.llm.vocab_size), "toy"
    except ValueError as e:
        raise PredictError(f"{checkpoint} has no tokenizer.json and {e}: pass --tokenizer") from None


def overlay_png(path: str, frames: np.ndarray, keep: np.ndarray | None, cfg, timestamps) -> None:
    """Writes the frames [T, S, S, 3] uint8 with pruned windows greyed out as one PNG grid."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PredictError("--overlay needs matplotlib: pip install matplotlib") from None
    from stts_jax.geometry import grid_size, window_patch_ids

    grid, pool, patch = grid_size(cfg), cfg.adapter.pool_size, cfg.vit.patch_size
    ids = window_patch_ids(grid, pool)
    shown = frames.astype(np.float32) / 255.0
    if keep is not None:
        for f in range(len(frames)):
            for w in np.nonzero(~keep[f])[0]:
                for pid in ids[w][ids[w] >= 0]:
                    r, c = divmod(int(pid), grid)
                    tile = shown[f, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                    shown[f, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0.25 * tile + 0.75 * 0.5
    cols = min(4, len(frames))
    rows = -(-len(frames) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for f, ax in enumerate(axes.ravel()[: len(frames)]):
        ax.imshow(shown[f])
        kept = "all" if keep is None else f"{int(keep[f].sum())}/{keep.shape[1]}"
        ax.set_title(f"t={timestamps[f]:.1f}s kept {kept}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predict(checkpoint: str, video: str, question: str, choices=None, *, frames: int = 8,
            ratio: float | None = None, max_new_tokens: int = 32, tokenizer: str | None = None,
            overlay: str | None = None, model=None) -> Prediction:
    """Returns the Prediction for one video and question (see the module docstring)."""
    from stts_jax import geometry
    from stts_jax.data.processor import (MC_INSTRUCTION, OPTION_LETTERS, Molmo2TextEncoder, PromptFormat,
                                         format_question, patchify, resize_frames)
    from stts_jax.data.video import VideoDecodeError, decode_uniform
    from stts_jax.eval.evaluate import EvalError, option_letter_ids
    from stts_jax.interop import params_io
    from stts_jax.model.generate import Generator, pad_prompts

    if overlay:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise PredictError("--overlay needs matplotlib: pip install matplotlib") from None
    if choices and len(choices) > len(OPTION_LETTERS):
        raise PredictError(f"at most {len(OPTION_LETTERS)} choices, got {len(choices)}")
    t_start = time.perf_counter()
    if model is None:
        try:
            model = params_io.load_checkpoint(checkpoint).model
        except params_io.ParamsCheckpointError as e:
            raise PredictError(f"--checkpoint: {e}") from None
    cfg = model.cfg
    if ratio is not None:
        if cfg.stts.method != "scorer":
            raise PredictError(f"--ratio needs a checkpoint with an STTS scorer; this one has "
                               f"stts.method={cfg.stts.method!r}")
        if not 0.0 <= ratio < 1.0:
            raise PredictError(f"--ratio must be in [0, 1), got {ratio}")
        cfg.stts.prune_ratio = float(ratio)
    use_ratio = cfg.stts.prune_ratio if cfg.stts.method != "none" else 0.0

    try:  # only the sampled frames are decoded and held (a long video would not fit in memory whole)
        clip = decode_uniform(video, frames)
    except VideoDecodeError as e:
        raise PredictError(f"--video: {e}") from None
    picked, stamps = clip.indices, clip.timestamps
    # frame by frame: a stream may change resolution mid-way
    resized = np.concatenate([resize_frames(np.asarray(f)[None], cfg.vit.image_size) for f in clip.frames])
    patches = patchify(resized, cfg.vit.patch_size)
    w, t = geometry.tokens_per_frame(cfg), len(picked)
    placeholders = geometry.placeholders_per_frame(cfg, t)  # W each, or W*T - K in all with STTS
    user_text = format_question(question, choices)
    tok, tok_name = prompt_tokenizer(checkpoint, tokenizer, cfg,
                                     [user_text, MC_INSTRUCTION, " ".join(OPTION_LETTERS), "0123456789 ."])
    fmt = PromptFormat(use_frame_special_tokens=uses_frame_special_tokens(checkpoint))
    try:
        encoder = Molmo2TextEncoder(tok, fmt)
        encoder.check_model_tokens(cfg.tokens)
        ids = encoder.prompt_ids(user_text, stamps, placeholders)
        letter_ids = option_letter_ids(tok, len(choices)) if choices else []
    except (ValueError, EvalError) as e:
        raise PredictError(str(e)) from None
    batch = pad_prompts([ids])  # one row
    batch["pixel_values"] = patches[None]  # [B=1, F=T, N, P*P*3]
    generator = Generator(model, geometry.FrameLayout.videos(t))  # the row: one video of T frames
    eos = tok.token_to_id(fmt.eos)
    t_model = time.perf_counter()
    out = generator.generate(batch, 1 if choices else max_new_tokens, stop_tokens=(eos,))
    seconds_model = time.perf_counter() - t_model
    logits = out.first_logits[0]
    probs = None
    if choices:
        if len(set(letter_ids)) != len(letter_ids):
            raise PredictError(f"the tokenizer maps option letters to colliding ids {letter_ids}")
        z = logits[letter_ids].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        probs = {f"{OPTION_LETTERS[i]}. {c}": float(p[i]) for i, c in enumerate(choices)}
        best = int(np.argmax(p))
        answer = f"{OPTION_LETTERS[best]}. {choices[best]}"
    else:
        gen = out.tokens[0, : out.lengths[0]]
        answer = tok.decode([int(x) for x in gen if int(x) != eos], skip_special_tokens=True)
    keep = None if out.keep is None else out.keep[0]  # [T, W] of the one row
    if overlay:
        overlay_png(overlay, resized, keep, cfg, stamps)
    return Prediction(answer=answer, option_probs=probs, vision_tokens_kept=geometry.vision_tokens_per_video(cfg, t),
                      vision_tokens_total=w * t, frames=t, frame_indices=picked.tolist(), prune_ratio=use_ratio,
                      seconds_total=time.perf_counter() - t_start, seconds_model=seconds_model, tokenizer=tok_name,
                      logits=logits, keep=keep)
