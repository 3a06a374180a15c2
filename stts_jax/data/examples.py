"""Record -> training example: decode + sample + preprocess the video, lay out and tokenise the prompt.

This is the per-example work the Grain pipeline runs in its worker processes, so it imports neither jax nor
the model: everything static (placeholder counts per frame from
`stts_jax.geometry.placeholders_per_frame`, sizes) is computed by the caller.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from stts_jax.data.processor import Molmo2TextEncoder, PromptFormat, format_answer, format_question, preprocess_frames
from stts_jax.data.video import VideoDecodeError, decode_clip


def _str(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


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
                 decode_threads: int = 1):
        if len(placeholders_per_frame) != num_frames:
            raise ValueError(f"{len(placeholders_per_frame)} placeholder counts for {num_frames} frames")
        self.tokenizer_path = tokenizer_path
        self.image_size, self.patch_size, self.num_frames = image_size, patch_size, num_frames
        self.placeholders = tuple(int(k) for k in placeholders_per_frame)
        self.max_fps, self.sampler, self.prompt_format = max_fps, sampler, prompt_format
        self.decode_threads = decode_threads
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
        ident = _str(record.get("id", "?"))
        try:
            return self._build(record, ident)
        except VideoDecodeError as e:
            return {"error": str(e), "error_kind": e.kind, "id": ident}
        except (ValueError, KeyError, TypeError, IndexError, UnicodeError) as e:
            where = _str(record.get("video_path", b""))
            return {"error": f"{where}: record {ident!r}: {type(e).__name__}: {e}", "error_kind": "bad_fields",
                    "id": ident}

    def _build(self, record: dict, ident: str) -> dict:
        path = _str(record["video_path"])
        video = record["video"]
        options = [_str(o) for o in record["options"]]  # fields first: a bad record costs no decoding
        question = format_question(_str(record["question"]), options)
        answer = format_answer(_str(record["answer"]), options, int(record["answer_index"]))
        clip = decode_clip(video if len(video) else path, self.num_frames, max_fps=self.max_fps,
                           sampler=self.sampler, name=path, threads=self.decode_threads)
        frames = preprocess_frames(clip.frames, self.image_size, self.patch_size)
        example = self.encoder.encode(question, answer, clip.timestamps, self.placeholders)
        example.update(frames=frames, record=np.asarray([record["index"]], np.int64), id=ident)
        return example
