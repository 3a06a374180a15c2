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

The tokenizer is the checkpoint's tokenizer.json (or --tokenizer). Without one (tiny random test models) a word
tokenizer over the prompt's words is built and the printed text is meaningless; the numbers are still the model's.
The prompt is the training pipeline's (Molmo2's layout; multiple-choice questions list "A. option" lines and the
instruction to answer with the letter). The work is done by `stts_jax.eval.predict`; this file is its flags.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from absl import app, flags, logging

from stts_jax import cli
from stts_jax.eval.predict import PredictError, predict

_CHECKPOINT = cli.checkpoint()
_VIDEO = flags.DEFINE_string("video", None, "Video file (mp4, ...).")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
_CHOICES = flags.DEFINE_list("choices", None, "Comma-separated answer options (multiple choice).")
_FRAMES = cli.frames(8, "Frames sampled uniformly from the video (first and last included).")
_RATIO = flags.DEFINE_float("ratio", None, "Prune ratio override (needs a checkpoint with an STTS scorer).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Free-form answers: tokens to generate at most.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: the checkpoint's, if any).")
_SAVE_LOGITS = flags.DEFINE_string("save_logits", None, "Write the answer position's logits [vocab] (.npy).")
_OVERLAY = flags.DEFINE_string("overlay", None, "Write the frames with pruned windows greyed out (.png).")
_JSON = flags.DEFINE_string("json", None, "Also write the result as JSON here.")

def main(argv):
    del argv
    with cli.refusals(PredictError):
        result = predict(_CHECKPOINT.value, _VIDEO.value, _QUESTION.value, _CHOICES.value, frames=_FRAMES.value,
                         ratio=_RATIO.value, max_new_tokens=_MAX_NEW.value, tokenizer=_TOKENIZER.value,
                         overlay=_OVERLAY.value)
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
    flags.mark_flags_as_required(["checkpoint", "video", "question"])
    logging.set_verbosity(logging.WARNING)
    app.run(main)
