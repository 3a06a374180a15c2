"""Molmo2 preprocessing of frames (resize, normalise, patchify) and the video prompt layout.

Pixels: each frame is resized straight to S x S (bilinear, half-pixel centres, no antialias), rounded and
clamped to uint8, then normalised to (x - 127.5) / 127.5 in float32 (transformers fuses 1/255 and mean =
std = 0.5 into exactly this). `resize_frames` reproduces PyTorch's CPU bilinear kernel *bit for bit*: the
kernel transformers runs when torch uses more than one thread (with one thread torch switches to a
channels-last kernel that rounds ~1e-5 of the values the other way). Torch computes, per output pixel,
  row(r) = fma(x[r, w0], lw0, x[r, w1] * lw1)          (float32, one rounding for the fused add)
  out    = fma(row(h0), lh0, row(h1) * lh1)
with source index fma(in/out, i + 0.5, -0.5) clamped at 0, as ATen's generic upsample kernel compiles. We run a
plain float32 pass and redo exactly (float64 fma emulation) only the pixels within 1e-3 of a rounding boundary.

Prompt (what `Molmo2Processor` + the Molmo2 chat template produce for one video and one question):
  <bos> VIDEO <|im_start|>user\\n QUESTION <|im_end|>\\n<|im_start|>assistant\\n  ANSWER <eos>
  VIDEO = for frame i: ("" if i == 0 else " ") + f"{t_i:.1f} " + <frame_start> + <im_patch> x k_i + <frame_end>
with bos = eos = "<|im_end|>" in the Qwen3-based Molmo2 tokenizer. Without pruning k_i = W (81); with STTS each
video reserves W*T - K placeholders in total, spread by `stts_jax.geometry.placeholders_per_frame`.
Multiple-choice questions are rendered by `format_question` (options as "A. ...", one per line, then an
instruction to answer with the letter; Molmo2's own wording for Video-MME and MVBench records) and answered with
the letter.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from stts_jax.geometry import placeholders_per_frame, tokens_per_frame

F32, F64 = np.float32, np.float64
_MIDPOINT_MASK = np.int64((1 << 29) - 1)  # float64 mantissa bits below float32 precision
_MIDPOINT = np.int64(1 << 28)  # ... exactly half a float32 ulp: a float32 rounding tie

# Molmo2 special-token strings -> config field in cfg.tokens (ids of the real tokenizer in stts_jax.config)
SPECIAL_TOKENS = {
    "<im_start>": "image_start_id",
    "<im_end>": "image_end_id",
    "<im_patch>": "image_patch_id",
    "<im_col>": "image_col_id",
    "<low_res_im_start>": "low_res_image_start_id",
    "<|image|>": "image_id",
    "<im_low>": "image_low_id",
    "<frame_start>": "frame_start_id",
    "<frame_end>": "frame_end_id",
    "<|video|>": "video_id",
}
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


# ----------------------------------------------------------------------------------------------- pixels

def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray, exact_sum: bool = False) -> np.ndarray:
    """Returns float32(a * b + c) rounded once, for float32-valued float64 inputs (a * b is exact in float64).

    The float64 sum can itself be inexact; that only matters when it lands exactly on a float32 rounding tie,
    which is then broken in the direction of the sum's exact error (TwoSum). `exact_sum` skips that check
    when the caller knows the float64 sum is exact.
    """
    p = a * b
    s = p + c
    out = s.astype(F32)
    if exact_sum:
        return out
    tie = (s.view(np.int64) & _MIDPOINT_MASK) == _MIDPOINT
    if tie.any():
        p_t, c_t, s_t = np.broadcast_to(p, s.shape)[tie], np.broadcast_to(c, s.shape)[tie], s[tie]
        b_t = s_t - p_t
        err = (p_t - (s_t - b_t)) + (c_t - b_t)
        nudged = np.nextafter(s_t, np.where(err > 0, np.inf, -np.inf))
        out[tie] = np.where(err != 0, nudged, s_t).astype(F32)
    return out


def _linear_weights(in_size: int, out_size: int):
    """Returns (i0, i1, l0, l1) of ATen's bilinear source indices/weights along one axis (l* float32)."""
    scale = F32(in_size) / F32(out_size)
    centre = (np.arange(out_size, dtype=F32) + F32(0.5)).astype(F64)
    real = np.maximum(_fma32(np.full(out_size, scale, F64), centre, np.full(out_size, -0.5)), F32(0))
    i0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    l1 = np.clip(real - i0.astype(F32), F32(0), F32(1)).astype(F32)
    l0 = (F32(1) - l1).astype(F32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, l0, l1


def _exact_points(frames_i: np.ndarray, rows: np.ndarray, cols: np.ndarray, chans: np.ndarray, hw, ww,
                  first_exact: bool) -> np.ndarray:
    """Returns torch's float32 bilinear values at output points (rows, cols, chans) of one frame, bit-exact."""
    h0, h1, hl0, hl1 = (v[rows] for v in hw)
    w0, w1, wl0, wl1 = (v[cols] for v in ww)

    def row(r):  # horizontal pass at input row r: fma(x[r, w0], lw0, x[r, w1] * lw1)
        a = frames_i[r, w0, chans].astype(F64)
        c = (frames_i[r, w1, chans].astype(F32) * wl1).astype(F64)
        return _fma32(a, wl0.astype(F64), c, exact_sum=first_exact)

    top, bottom = row(h0), row(h1)
    return _fma32(top.astype(F64), hl0.astype(F64), (bottom * hl1).astype(F64))


def resize_frames(frames: np.ndarray, size: int, block: int = 64) -> np.ndarray:
    """Returns uint8 [T, size, size, 3]: bilinear (half-pixel centres, no antialias), rounded and clamped.

    Bit-identical to torch's multi-threaded CPU kernel that transformers' Molmo2VideoProcessor runs: a fast
    float32 pass (within a few float32 ulps of torch) decides every pixel whose value is not within 1e-3 of a
    rounding boundary (x.5); those few are recomputed exactly as torch computes them (`_exact_points`).
    Output rows are produced `block` at a time so the temporaries stay in cache.
    """
    frames = np.asarray(frames)
    t, h, w, c = frames.shape
    hw, ww = _linear_weights(h, size), _linear_weights(w, size)
    h0, h1, hl0, hl1 = hw
    w0, w1, wl0, wl1 = ww
    # with integer pixels and weights no finer than 2^-20 the float64 sums of the first pass are exact
    first_exact = bool(np.all((wl1 == 0) | (wl1 >= 2.0 ** -20)))
    # work on [rows, width * channels]: column k of an output row is pixel k // c, channel k % c
    col0 = (w0[:, None] * c + np.arange(c)).reshape(-1)
    col1 = (w1[:, None] * c + np.arange(c)).reshape(-1)
    lw0, lw1 = np.repeat(wl0, c), np.repeat(wl1, c)
    out = np.empty((t, size, size * c), np.uint8)
    y_buf, tmp_buf = np.empty((block, size * c), F32), np.empty((block, size * c), F32)
    for i in range(t):
        x = frames[i].reshape(h, w * c)
        rows = np.take(x, col0, axis=1).astype(F32)
        rows *= lw0
        other = np.take(x, col1, axis=1).astype(F32)
        other *= lw1
        rows += other  # [h, size * c]: the horizontal pass of every input row
        for start in range(0, size, block):
            stop = min(size, start + block)
            y, tmp = y_buf[: stop - start], tmp_buf[: stop - start]
            np.take(rows, h0[start:stop], axis=0, out=y)
            y *= hl0[start:stop, None]
            np.take(rows, h1[start:stop], axis=0, out=tmp)
            tmp *= hl1[start:stop, None]
            y += tmp
            y += F32(0.5)
            rounded = y.astype(np.int32)  # floor(y + 0.5): y >= 0
            np.subtract(y, rounded, out=tmp)  # distance above the rounding boundary, in [0, 1)
            near = (tmp < F32(1e-3)) | (tmp > F32(1 - 1e-3))
            if near.any():
                rr, kk = np.nonzero(near)
                exact = _exact_points(frames[i], rr + start, kk // c, kk % c, hw, ww, first_exact)
                rounded[rr, kk] = np.rint(exact)  # half to even, as torch.round
            np.clip(rounded, 0, 255, out=rounded)
            out[i, start:stop] = rounded
    return out.reshape(t, size, size, c)


def patchify_uint8(frames: np.ndarray, patch: int) -> np.ndarray:
    """Returns uint8 [T, n*n, patch*patch*3]: row-major patches, (y, x, channel) inside each, channel fastest."""
    t, h, w, c = frames.shape
    n = h // patch
    x = np.asarray(frames).reshape(t, n, patch, n, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x).reshape(t, n * n, patch * patch * c)


def normalize_pixels(pixels: np.ndarray) -> np.ndarray:
    """Returns float32 (x - 127.5) / 127.5 of uint8 pixels, in [-1, 1]: transformers' fused rescale + normalise."""
    return (np.asarray(pixels, F32) - F32(127.5)) / F32(127.5)


def patchify(frames: np.ndarray, patch: int) -> np.ndarray:
    """Returns [T, n*n, patch*patch*3] float32 in [-1, 1]: row-major patches, (y, x, channel) inside each."""
    return normalize_pixels(patchify_uint8(frames, patch))


def preprocess_frames(frames: np.ndarray, size: int, patch: int) -> np.ndarray:
    """Returns uint8 patches [T, (size/patch)^2, patch*patch*3] of frames resized as Molmo2 does.

    `frames` is uint8 [T, H, W, 3], or a list of [H_t, W_t, 3] frames of differing sizes (a stream that changes
    resolution mid-way), each resized on its own.
    """
    if not isinstance(frames, np.ndarray):
        return np.concatenate([preprocess_frames(np.asarray(f)[None], size, patch) for f in frames])
    return patchify_uint8(resize_frames(frames, size), patch)


# ------------------------------------------------------------------------------------------------- text

# Multiple-choice prompt wording per benchmark (allenai/molmo2 olmo/data/academic_video_datasets.py: Video-MME's
# `question_template`, MVBench's `qa_template`); every other benchmark and our own data use MC_INSTRUCTION (also
# Molmo2's MLVU wording). Options are always "A. option" lines.
PROMPT_TEMPLATES = ("default", "videomme", "mvbench")


def template_for(benchmark: str) -> str:
    """Returns the prompt template of a record's `benchmark` field ("" or unknown names: "default")."""
    return benchmark if benchmark in PROMPT_TEMPLATES else "default"


def format_question(question: str, options: Sequence[str] | None = None, template: str = "default") -> str:
    """Returns the user text: the question, plus "A. option" lines and the template's instruction when
    multiple-choice (`template`: one of PROMPT_TEMPLATES; open questions are the question alone)."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template must be one of {PROMPT_TEMPLATES}, got {template!r}")
    if not options:
        return question
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {len(options)}")
    lines = [f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)]
    if template == "videomme":
        letters = list(OPTION_LETTERS[: len(options)])
        choices = ", ".join(letters[:-1]) + (", or " if len(letters) > 2 else " or ") + letters[-1]
        head = ("Select the best answer to the following multiple-choice question based on the video. Respond with "
                f"only the letter ({choices}) of the correct option.")
        return "\n".join([head, question, *lines, "The best answer is:"])
    if template == "mvbench":
        return "\n".join([question, *lines, "Please respond with only the letter of the correct answer."])
    return "\n".join([question, *lines, MC_INSTRUCTION])


def format_answer(answer: str | None, options: Sequence[str] | None = None, answer_index: int = -1) -> str:
    """Returns the target text: the option letter for multiple-choice, else the free-form answer."""
    if options:
        if not 0 <= answer_index < len(options):
            raise ValueError(f"answer_index {answer_index} does not pick one of {len(options)} options")
        return OPTION_LETTERS[answer_index]
    if answer is None:
        raise ValueError("an open question needs an answer")
    return answer


def video_text(timestamps: Sequence[float], placeholders_per_frame: Sequence[int], *,
               use_frame_special_tokens: bool = True) -> str:
    """Returns the text that replaces <|video|>: timestamp, frame start, placeholders, frame end per frame."""
    start, end = ("<frame_start>", "<frame_end>") if use_frame_special_tokens else ("<im_start>", "<im_end>")
    parts = []
    for i, (t, k) in enumerate(zip(timestamps, placeholders_per_frame, strict=True)):
        parts.append(("" if i == 0 else " ") + f"{t:.1f} " + start + "<im_patch>" * int(k) + end)
    return "".join(parts)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """The Molmo2 chat layout around one video and one question (defaults: the released Molmo2 template)."""

    bos: str = "<|im_end|>"  # Molmo2Processor prepends tokenizer.bos_token (= eos in the Qwen3 tokenizer)
    eos: str = "<|im_end|>"
    user_start: str = "<|im_start|>user\n"
    user_end: str = "<|im_end|>\n"
    assistant_start: str = "<|im_start|>assistant\n"
    use_frame_special_tokens: bool = True

    def prompt(self, video: str, question: str) -> str:
        """Returns the prompt text (everything before the answer) with `video` in place of <|video|>."""
        return self.bos + video + self.user_start + question + self.user_end + self.assistant_start


class Molmo2TextEncoder:
    """Tokenises Molmo2 video prompts with a Hugging Face `tokenizers.Tokenizer` (from a tokenizer.json).

    `encode` returns next-token training arrays: input_ids [L], targets [L] (input_ids shifted left, -1
    after the last token), loss_mask [L] (1 where the target is an answer token, incl. the final eos).
    The prompt and the answer are tokenised separately (the prompt ends in "\\n", which Qwen's byte-level
    pre-tokeniser never merges with the next word, so this equals tokenising the joined text). User text
    (question, answer) that tokenises to any special or added token (`<im_patch>`, `<frame_end>`, `<|im_end|>`
    ...) is refused with ValueError: it would add placeholders or chat turns the layout does not reserve. Every
    prompt is then checked for exactly its reserved placeholders and frame markers.
    """

    def __init__(self, tokenizer, fmt: PromptFormat = PromptFormat()):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.special_ids = {}
        for text, field in SPECIAL_TOKENS.items():
            token_id = tokenizer.token_to_id(text)
            if token_id is not None:
                self.special_ids[field] = token_id
        for text in (fmt.bos, fmt.eos):
            if tokenizer.token_to_id(text) is None:
                raise ValueError(f"the tokenizer has no token {text!r} (bos/eos of the prompt format)")
        self.reserved_ids = set(tokenizer.get_added_tokens_decoder()) | set(self.special_ids.values())

    def check_model_tokens(self, tokens: Mapping[str, int]) -> None:
        """Raises ValueError naming the first special token whose tokenizer id differs from the model config's."""
        for text, field in SPECIAL_TOKENS.items():
            if field not in tokens:
                continue
            got = self.special_ids.get(field)
            if got != tokens[field]:
                raise ValueError(f"tokenizer maps {text} to {got}, but the model config's tokens.{field} is "
                                 f"{tokens[field]}: use the tokenizer the model was trained with")

    def ids(self, text: str) -> list[int]:
        """Returns the token ids of `text` (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def user_ids(self, text: str, field: str) -> list[int]:
        """Returns the ids of user text, refusing text that tokenises to a special / added token."""
        ids = self.ids(text)
        injected = sorted({self.tokenizer.id_to_token(i) for i in ids if i in self.reserved_ids})
        if injected:
            raise ValueError(f"the {field} contains special-token text {injected}; refused (it would add tokens the "
                             "prompt layout does not reserve)")
        return ids

    def prompt_ids(self, question: str, timestamps: Sequence[float],
                   placeholders_per_frame: Sequence[int]) -> list[int]:
        """Returns the prompt's token ids (bos, video, user turn, assistant header)."""
        video = video_text(timestamps, placeholders_per_frame,
                           use_frame_special_tokens=self.fmt.use_frame_special_tokens)
        self.user_ids(question, "question")  # refuses special-token text
        ids = self.ids(self.fmt.prompt(video, question))  # joined: a leading newline merges as in Molmo2Processor
        self.check_layout(ids, placeholders_per_frame)
        return ids

    def check_layout(self, ids: Sequence[int], placeholders_per_frame: Sequence[int]) -> None:
        """Raises ValueError unless `ids` hold exactly the placeholders and frame markers of the frames."""
        start, end = (("frame_start_id", "frame_end_id") if self.fmt.use_frame_special_tokens
                      else ("image_start_id", "image_end_id"))
        frames = len(placeholders_per_frame)
        want = {"image_patch_id": int(sum(placeholders_per_frame)), start: frames, end: frames}
        counts = collections.Counter(ids)
        for field, n in want.items():
            got = counts[self.special_ids[field]] if field in self.special_ids else None
            if got != n:
                raise ValueError(f"the prompt holds {got} {field} tokens where the layout reserves {n}")

    def encode(self, question: str, answer: str, timestamps: Sequence[float],
               placeholders_per_frame: Sequence[int]) -> dict[str, np.ndarray]:
        """Returns dict(input_ids, targets, loss_mask) int32 [L] for one example."""
        prompt = self.prompt_ids(question, timestamps, placeholders_per_frame)
        self.user_ids(answer, "answer")  # refuses special-token text
        answer_ids = self.ids(answer + self.fmt.eos)
        tokens = np.asarray(prompt + answer_ids, np.int32)
        targets = np.full_like(tokens, -1)
        targets[:-1] = tokens[1:]
        loss_mask = np.zeros_like(tokens)
        loss_mask[len(prompt) - 1: len(tokens) - 1] = 1  # positions whose next token is an answer token
        return dict(input_ids=tokens, targets=targets, loss_mask=loss_mask)


def video_token_layout(cfg: ml_collections.ConfigDict, timestamp_ids: list[list[int]],
                       tokens_per_frame_kept: list[int] | None = None) -> list[int]:
    """Returns the token ids of a video: per frame `timestamp ids, <frame_start>, <im_patch> x k, <frame_end>`.

    `timestamp_ids[i]` are the tokenised text of frame i's timestamp; k defaults to the tokens per frame.
    """
    per_frame = tokens_per_frame(cfg)
    ids: list[int] = []
    for i, stamp in enumerate(timestamp_ids):
        k = per_frame if tokens_per_frame_kept is None else tokens_per_frame_kept[i]
        ids += list(stamp) + [cfg.tokens.frame_start_id] + [cfg.tokens.image_patch_id] * k + [cfg.tokens.frame_end_id]
    return ids


def random_video_prompt(cfg: ml_collections.ConfigDict, rng: np.random.Generator, num_frames: int, *,
                        stamp_tokens: int = 2, vocab: int = 1000) -> list[int]:
    """Returns the ids of a random-text video prompt with the real layout, for benchmarks and synthetic batches:
    one text id, then per frame `stamp_tokens` text ids + <frame_start> + its placeholders (W, or the STTS
    reservation) + <frame_end>. Text ids are drawn from [0, min(vocab, llm vocab)); callers add the question."""
    high = min(cfg.llm.vocab_size, vocab)
    first = [int(rng.integers(0, high))]
    stamps = [[int(x) for x in rng.integers(0, high, stamp_tokens)] for _ in range(num_frames)]
    return first + video_token_layout(cfg, stamps, list(placeholders_per_frame(cfg, num_frames)))


def prompt_overhead_tokens(num_frames: int, stamp_tokens: int = 2) -> int:
    """Returns the non-placeholder tokens of a video's frames: per frame its timestamp + <frame_start> + <frame_end>."""
    return num_frames * (stamp_tokens + 2)
