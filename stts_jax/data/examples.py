"""Record -> training example: decode + sample + preprocess the video, lay out and tokenise the prompt.

This is the per-example work the Grain pipeline runs in its worker processes, so it imports neither jax nor
the model: everything static (placeholder counts per frame from
`stts_jax.geometry.placeholders_per_frame`, sizes) is computed by the caller.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from stts_jax.data.isolated import IsolatedDecoder, decode_patches
from stts_jax.data.processor import (Molmo2TextEncoder, PromptFormat, format_answer, format_question,
                                     template_for)
from stts_jax.data.video import VideoDecodeError

DECODE_TIMEOUT_S = 600.0  # a whole hour of 1080p decodes in ~5 min on one core; 0 = decode in this process
DECODE_MEMORY_BYTES = 8 << 30


def _str(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _label(value) -> str:
    """Like _str, for names in messages: undecodable bytes are replaced, never raised."""
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


class ExampleBuilder:
    """Callable turning a `video_qa` record into a training example, or an error marker for a bad video.

    Example: input_ids / targets / loss_mask int32 [L], frames uint8 [T, N, patch*patch*3] (resized and
    patchified, not yet normalised), record int64 [1] (the record's `index`), id (str).
    Error marker: {"error": message naming the file, "error_kind": ..., "id": ...}, for every per-example
    failure: a bad video (VideoDecodeError.kind), or a record whose fields cannot make an example ("bad_fields":
    too many options, an answer_index that picks none, undecodable text, ...).
    """

    def __init__(self, tokenizer_path: str, *, image_size: int, patch_size: int, num_frames: int,
                 placeholders_per_frame: Sequence[int], max_fps: float | None = 2.0,
                 sampler: str = "uniform_last_frame", prompt_format: PromptFormat = PromptFormat(),
                 decode_threads: int = 1, decode_timeout_s: float = DECODE_TIMEOUT_S,
                 decode_memory_bytes: int = DECODE_MEMORY_BYTES):
        """`decode_timeout_s` > 0: each video is decoded in a child process (`IsolatedDecoder`) within that time
        and `decode_memory_bytes`, so a hang or crash costs that example ("timeout" / "crashed"); 0: in this
        process."""
        if len(placeholders_per_frame) != num_frames:
            raise ValueError(f"{len(placeholders_per_frame)} placeholder counts for {num_frames} frames")
        self.tokenizer_path = tokenizer_path
        self.image_size, self.patch_size, self.num_frames = image_size, patch_size, num_frames
        self.placeholders = tuple(int(k) for k in placeholders_per_frame)
        self.max_fps, self.sampler, self.prompt_format = max_fps, sampler, prompt_format
        self.decode_threads = decode_threads
        self._decode = IsolatedDecoder(decode_timeout_s, decode_memory_bytes) if decode_timeout_s > 0 else decode_patches
        self._encoder = None

    def __getstate__(self):  # workers rebuild the tokenizer from its file
        state = dict(self.__dict__)
        state["_encoder"] = None
        return state

    @property
    def encoder(self) -> Molmo2TextEncoder:
        """Returns the text encoder (loads the tokenizer on first use)."""
        if self._encoder is None:
            from stts_jax.data.tokenizer import load_tokenizer

            self._encoder = Molmo2TextEncoder(load_tokenizer(self.tokenizer_path), self.prompt_format)
        return self._encoder

    def __call__(self, record: dict) -> dict:
        """Returns the example dict (or the error marker) of one record."""
        ident = _label(record.get("id", "?"))
        try:
            return self._build(record, ident)
        except VideoDecodeError as e:
            return {"error": str(e), "error_kind": e.kind, "id": ident}
        except (ValueError, KeyError, TypeError, IndexError, UnicodeError) as e:
            where = _label(record.get("video_path", b""))
            return {"error": f"{where}: record {ident!r}: {type(e).__name__}: {e}", "error_kind": "bad_fields",
                    "id": ident}

    def _build(self, record: dict, ident: str) -> dict:
        path = _str(record["video_path"])
        video = record["video"]
        options = [_str(o) for o in record["options"]]  # fields first: a bad record costs no decoding
        question = format_question(_str(record["question"]), options,
                                   template_for(_str(record.get("benchmark", b""))))
        answer = format_answer(_str(record["answer"]), options, int(record["answer_index"]))
        frames, timestamps = self._decode(
            name=path, src=video if len(video) else path, num_frames=self.num_frames, max_fps=self.max_fps,
            sampler=self.sampler, threads=self.decode_threads, image_size=self.image_size, patch_size=self.patch_size)
        example = self.encoder.encode(question, answer, timestamps, self.placeholders)
        example.update(frames=frames, record=np.asarray([record["index"]], np.int64), id=ident)
        return example
