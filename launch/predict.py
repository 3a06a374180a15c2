"""Answer a question about a video with one checkpoint: the first command to run on your own video.

  python launch/predict.py --checkpoint=/path/to/export_or_params --video=clip.mp4 \\
      --question="What is the man holding?" --choices="a cup,a phone,a book" \\
      [--frames=16] [--ratio=0.5] [--save_logits=answer_logits.npy] [--overlay=pruned.png]

--checkpoint is a Hugging Face directory (config.json + safetensors; an export of this project carries
stts_config.json and stts_scorer.safetensors), a params checkpoint written by launch/import_hf.py or
`stts_jax.interop.params_io.save_model`, or a training workdir (its latest checkpoint's parameters). With --choices the answer is the most probable option letter and
the option probabilities are the softmax over the letters' logits at the answer position; without, the
answer is generated greedily (KV cache, `stts_jax.model.generate`) up to --max_new_tokens.
Prints the answer, the probabilities, the vision tokens kept (W*T - K of W*T) and the time taken.
--ratio/--frames override the checkpoint's prune ratio / the number of sampled frames (test-time scaling:
more frames at the same token budget). --save_logits writes the full-vocabulary logits [vocab] of the answer
position; --overlay a PNG of the sampled frames with the pruned windows greyed out (needs matplotlib).

The tokenizer is the checkpoint's tokenizer.json (or --tokenizer). Without one (tiny random test models) a
toy word-hash tokenizer is used and the printed text is meaningless; the numbers are still the model's.
Prompt layout (Molmo2): bos, per frame "t.t " <frame_start> <im_patch> x k <frame_end>, then
"<|im_start|>user\\n" question "<|im_end|>\\n<|im_start|>assistant\\n"; multiple-choice questions list the
options as "A. option" lines followed by an instruction to answer with the letter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import zlib

import numpy as np
from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face directory or params checkpoint.")
_VIDEO = flags.DEFINE_string("video", None, "Video file (mp4, ...).")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
_CHOICES = flags.DEFINE_list("choices", None, "Comma-separated answer options (multiple choice).")
_FRAMES = flags.DEFINE_integer("frames", 8, "Frames sampled uniformly from the video (first and last included).")
_RATIO = flags.DEFINE_float("ratio", None, "Prune ratio override (needs a checkpoint with an STTS scorer).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Free-form answers: tokens to generate at most.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: the checkpoint's, if any).")
_SAVE_LOGITS = flags.DEFINE_string("save_logits", None, "Write the answer position's logits [vocab] (.npy).")
_OVERLAY = flags.DEFINE_string("overlay", None, "Write the frames with pruned windows greyed out (.png).")
_JSON = flags.DEFINE_string("json", None, "Also write the result as JSON here.")

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
USER_START, TURN_END, ASSISTANT_START = "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n"
BOS_EOS = "<|im_end|>"


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


class ToyTokenizer:
    """Word-hash tokenizer for random test models: words -> crc32 % vocab (special strings too)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def user_ids(self, text: str) -> list[int]:
        """Returns the ids of the user's text (a word hash never produces a layout id's meaning)."""
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        """Returns ids of whitespace-separated pieces (special strings are single pieces)."""
        for special in ("<|im_start|>", "<|im_end|>"):
            text = text.replace(special, f" {special} ")
        return [zlib.crc32(w.encode()) % self.vocab_size for w in text.split()]

    def token_id(self, text: str) -> int:
        return self.encode(text)[0]

    def decode(self, ids) -> str:
        return " ".join(f"<{i}>" for i in ids)


class HFTokenizer:
    """A `tokenizers.Tokenizer` from tokenizer.json."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def user_ids(self, text: str) -> list[int]:
        """Returns the ids of the user's text, refusing text that tokenises to a special / added token."""
        ids = self.encode(text)
        added = self.tok.get_added_tokens_decoder()
        injected = sorted({added[i].content for i in ids if i in added})
        if injected:
            raise PredictError(f"the question contains special-token text {injected}; refused (it would add "
                               "tokens the prompt layout does not reserve)")
        return ids

    def token_id(self, text: str) -> int:
        tid = self.tok.token_to_id(text)
        if tid is None:
            ids = self.encode(text)
            if len(ids) != 1:
                raise PredictError(f"the tokenizer splits {text!r} into {len(ids)} tokens; expected one")
            tid = ids[0]
        return tid

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_checkpoint(path: str):
    """Returns (model, kind) for a params checkpoint, a training workdir or a Hugging Face directory."""
    from stts_jax.interop import params_io

    try:
        found = params_io.load_checkpoint(path)
    except params_io.ParamsCheckpointError as e:
        raise PredictError(f"--checkpoint: {e}") from None
    return found.model, found.kind


def load_tokenizer(checkpoint: str, tokenizer: str | None, vocab_size: int):
    """Returns (tokenizer, description)."""
    path = tokenizer or os.path.join(checkpoint, "tokenizer.json")
    if tokenizer and not os.path.exists(path):
        raise PredictError(f"--tokenizer {path} does not exist")
    if os.path.exists(path):
        return HFTokenizer(path), path
    logging.warning("no tokenizer.json in %s: using a toy word-hash tokenizer (text output is meaningless)",
                    checkpoint)
    return ToyTokenizer(vocab_size), "toy"


def question_text(question: str, choices) -> str:
    """Returns the user text: the question, plus "A. option" lines and the instruction if multiple-choice."""
    if not choices:
        return question
    if len(choices) > len(OPTION_LETTERS):
        raise PredictError(f"at most {len(OPTION_LETTERS)} choices, got {len(choices)}")
    return "\n".join([question] + [f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices)] + [MC_INSTRUCTION])


def uses_frame_special_tokens(checkpoint: str) -> bool:
    """Returns the processor's `use_frame_special_tokens` (False: <im_start>/<im_end> delimit frames), default True."""
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        path = os.path.join(checkpoint, name)
        if os.path.exists(path):
            with open(path) as f:
                value = json.load(f).get("use_frame_special_tokens")
            if value is not None:
                return bool(value)
    return True


def prompt_ids(tok, cfg, timestamps, placeholders, question: str, frame_tokens: bool = True) -> list[int]:
    """Returns the Molmo2 prompt's token ids (bos, video, user turn, assistant header).

    Text between special tokens is tokenised piece by piece (special tokens split the text anyway).
    """
    t = cfg.tokens
    start, end = (t.frame_start_id, t.frame_end_id) if frame_tokens else (t.image_start_id, t.image_end_id)
    ids = [tok.token_id(BOS_EOS)]
    for i, (stamp, k) in enumerate(zip(timestamps, placeholders)):
        ids += tok.encode(("" if i == 0 else " ") + f"{stamp:.1f} ")
        ids += [start] + [t.image_patch_id] * int(k) + [end]
    tok.user_ids(question)  # refuses special-token text
    return ids + tok.encode(USER_START + question + TURN_END + ASSISTANT_START)


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
    from stts_jax.data.processor import patchify, resize_frames
    from stts_jax.data.video import VideoDecodeError, decode_uniform
    from stts_jax.model.generate import Generator, pad_prompts

    if overlay:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise PredictError("--overlay needs matplotlib: pip install matplotlib") from None
    t_start = time.perf_counter()
    if model is None:
        model, _ = load_checkpoint(checkpoint)
    cfg = model.cfg
    if ratio is not None:
        if cfg.stts.method != "scorer":
            raise PredictError(f"--ratio needs a checkpoint with an STTS scorer; this one has "
                               f"stts.method={cfg.stts.method!r}")
        if not 0.0 <= ratio < 1.0:
            raise PredictError(f"--ratio must be in [0, 1), got {ratio}")
        cfg.stts.prune_ratio = float(ratio)
    pruned = cfg.stts.method != "none"
    use_ratio = cfg.stts.prune_ratio if pruned else 0.0
    tok, tok_name = load_tokenizer(checkpoint, tokenizer, cfg.llm.vocab_size)

    try:  # only the sampled frames are decoded and held (a long video would not fit in memory whole)
        clip = decode_uniform(video, frames)
    except VideoDecodeError as e:
        raise PredictError(f"--video: {e}") from None
    picked, stamps = clip.indices, clip.timestamps
    # frame by frame: a stream may change resolution mid-way
    resized = np.concatenate([resize_frames(np.asarray(f)[None], cfg.vit.image_size) for f in clip.frames])
    patches = patchify(resized, cfg.vit.patch_size)
    w = geometry.tokens_per_frame(cfg)
    t = len(picked)
    placeholders = geometry.placeholders_per_frame(cfg, t)  # W each, or W*T - K in all with STTS
    ids = prompt_ids(tok, cfg, stamps, placeholders, question_text(question, choices),
                     uses_frame_special_tokens(checkpoint))
    batch = pad_prompts([ids])  # one row
    batch["pixel_values"] = patches[None]  # [B=1, F=T, N, P*P*3]
    generator = Generator(model, geometry.FrameLayout.videos(t))  # the row: one video of T frames
    eos = tok.token_id(BOS_EOS)
    t_model = time.perf_counter()
    out = generator.generate(batch, 1 if choices else max_new_tokens, stop_tokens=(eos,))
    seconds_model = time.perf_counter() - t_model
    logits = out.first_logits[0]
    probs = None
    if choices:
        letter_ids = [tok.token_id(OPTION_LETTERS[i]) for i in range(len(choices))]
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
        answer = tok.decode([int(x) for x in gen if int(x) != eos])
    kept = geometry.vision_tokens_per_video(cfg, t)
    keep = None if out.keep is None else out.keep[0]  # [T, W] of the one row
    if overlay:
        overlay_png(overlay, resized, keep, cfg, stamps)
    return Prediction(answer=answer, option_probs=probs, vision_tokens_kept=kept, vision_tokens_total=w * t,
                      frames=t, frame_indices=picked.tolist(), prune_ratio=use_ratio,
                      seconds_total=time.perf_counter() - t_start, seconds_model=seconds_model, tokenizer=tok_name,
                      logits=logits, keep=keep)


def main(argv):
    del argv
    for name, flag in (("checkpoint", _CHECKPOINT), ("video", _VIDEO), ("question", _QUESTION)):
        if flag.value is None:
            raise app.UsageError(f"--{name} is required")
    try:
        result = predict(_CHECKPOINT.value, _VIDEO.value, _QUESTION.value, _CHOICES.value, frames=_FRAMES.value,
                         ratio=_RATIO.value, max_new_tokens=_MAX_NEW.value, tokenizer=_TOKENIZER.value,
                         overlay=_OVERLAY.value)
    except PredictError as e:
        print(f"predict: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"answer: {result.answer}")
    if result.option_probs:
        for option, p in result.option_probs.items():
            print(f"  P({option}) = {p:.4f}")
    print(f"vision tokens kept: {result.vision_tokens_kept} of {result.vision_tokens_total} "
          f"({result.frames} frames, prune ratio {result.prune_ratio}); frames {result.frame_indices}")
    print(f"time: {result.seconds_total:.2f} s total, {result.seconds_model:.2f} s model (incl. compilation); "
          f"tokenizer: {result.tokenizer}")
    if _SAVE_LOGITS.value:
        np.save(_SAVE_LOGITS.value, result.logits)
        print(f"logits [{result.logits.shape[0]}] -> {_SAVE_LOGITS.value}")
    if _OVERLAY.value:
        print(f"overlay -> {_OVERLAY.value}")
    if _JSON.value:
        data = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("logits", "keep")}
        with open(_JSON.value, "w") as f:
            json.dump(data, f, indent=2)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
