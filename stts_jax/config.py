"""Configuration: the model, data and training ConfigDicts (ml_collections) and the validators every entry point
shares (`validate_model_config`, `validate_data_config`, `validate_train_config`).

A model config has three parts, named after the three stages of the data flow:

  vit      SigLIP2-style ViT (patch 14, learned position embedding, pre-LN blocks)
  adapter  multi-layer features -> attention pooling over pool x pool windows -> SwiGLU projector
  llm      Qwen3-style decoder (RMSNorm, RoPE, GQA, per-head qk-norm, SwiGLU)

plus `tokens` (the special-token ids of the prompt layout) and `dtype` / `param_dtype`.
Everything that decides a shape is a Python int here; `validate_model_config` refuses impossible
settings before any work starts, naming the offending field.
"""

from __future__ import annotations

import math

import ml_collections

# Special-token ids of the real Molmo2 tokenizer (base vocabulary 151,936 + 128 additional).
MOLMO2_TOKENS = dict(
    image_start_id=151936,
    image_end_id=151937,
    image_patch_id=151938,
    image_col_id=151939,
    low_res_image_start_id=151940,
    image_id=151941,
    image_low_id=151942,
    frame_start_id=151943,
    frame_end_id=151944,
    video_id=151945,
)

ROPE_TYPES = ("default", "linear")  # yarn / llama3 / dynamic: not yet ported


def vit_config(**overrides) -> ml_collections.ConfigDict:
    """Returns a ViT config with SigLIP2-so400m shapes (25 blocks, as the released Molmo2 weights)."""
    cfg = ml_collections.ConfigDict(
        dict(
            hidden_size=1152,
            num_layers=25,
            num_heads=16,
            head_dim=72,
            mlp_dim=4304,
            patch_size=14,
            image_size=378,
            num_channels=3,
            layer_norm_eps=1e-6,
        )
    )
    cfg.update(overrides)
    return cfg


def adapter_config(**overrides) -> ml_collections.ConfigDict:
    """Returns an adapter config with Molmo2-4B shapes (layers (24, 18), 3x3 video pooling)."""
    cfg = ml_collections.ConfigDict(
        dict(
            feature_layers=(24, 18),  # 0-based ViT block indices whose outputs are concatenated
            num_heads=16,
            head_dim=72,
            mlp_dim=9728,
            pool_size=3,  # video frames: 3x3 windows; 27x27 patches -> 81 tokens per frame
        )
    )
    cfg.update(overrides)
    return cfg


def llm_config(**overrides) -> ml_collections.ConfigDict:
    """Returns an LLM config with Qwen3-4B shapes."""
    cfg = ml_collections.ConfigDict(
        dict(
            hidden_size=2560,
            num_layers=36,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            mlp_dim=9728,
            vocab_size=151936,
            additional_vocab_size=128,
            rms_norm_eps=1e-6,
            qk_norm_type="qwen3",
            norm_after=False,
            rope_theta=1_000_000.0,
            rope_type="default",
            rope_factor=1.0,
            rope_scaling_layers=(),  # empty = every layer uses the scaled RoPE
        )
    )
    cfg.update(overrides)
    return cfg


STTS_METHODS = ("scorer", "evs", "random", "none")


def stts_config(**overrides) -> ml_collections.ConfigDict:
    """Returns STTS settings (spec §8 knobs); defaults are the paper's: scorer, ratio 0.5, prune_at 3, λ 0.5."""
    cfg = ml_collections.ConfigDict(
        dict(
            method="scorer",  # scorer | evs (training-free: 1 - cos to the previous frame) | random | none
            prune_ratio=0.5,
            prune_at=3,  # the scorer reads the output of this ViT block; block prune_at+1 gets the log-score bias
            aux_loss_weight=0.5,
            bias_floor=math.exp(-2.0),
            prune_from_frame=0,
            pool_size=3,  # must equal adapter.pool_size: a window is one LLM token
            rescale_scope="frame",  # frame | row (compat)
            pairing="per-video",  # per-video | flat (compat)
            aux_target_grad="stop",  # stop | pass (compat)
            execution="masked",  # masked | packed
            pack_slack=0.05,  # packed: row budget = ceil((1 + slack) * kept windows / W); overflow -> masked
            refill=False,
            score_bias=True,  # the soft bias that carries LM gradients to the scorer (off only for ablations)
        )
    )
    cfg.update(overrides)
    return cfg


def model_config(vit=None, adapter=None, llm=None, stts=None, **overrides) -> ml_collections.ConfigDict:
    """Returns a full VLM model config assembled from the part configs (STTS off unless `stts` is given)."""
    cfg = ml_collections.ConfigDict(
        dict(
            vit=vit if vit is not None else vit_config(),
            adapter=adapter if adapter is not None else adapter_config(),
            llm=llm if llm is not None else llm_config(),
            stts=stts if stts is not None else stts_config(method="none"),
            tokens=ml_collections.ConfigDict(dict(MOLMO2_TOKENS)),
            dtype="float32",
            param_dtype="float32",
            remat=False,  # recompute each ViT block / LLM layer in the backward pass (saves activation memory)
        )
    )
    cfg.update(overrides)
    return cfg


def tiny_model_config() -> ml_collections.ConfigDict:
    """Returns a tiny config (126 px frames, 9x9 patches, 9 tokens per frame) that runs in ms on a CPU."""
    return model_config(
        vit=vit_config(hidden_size=32, num_layers=3, num_heads=2, head_dim=16, mlp_dim=64, image_size=126),
        adapter=adapter_config(feature_layers=(2, 1), num_heads=2, head_dim=16, mlp_dim=48),
        llm=llm_config(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
            vocab_size=100, additional_vocab_size=16, rope_theta=10000.0,
        ),
        stts=stts_config(method="none", prune_at=0),
        tokens=ml_collections.ConfigDict(dict(
            image_start_id=100, image_end_id=101, image_patch_id=102, image_col_id=103,
            low_res_image_start_id=104, image_id=105, image_low_id=106, frame_start_id=107,
            frame_end_id=108, video_id=109,
        )),
    )


class ConfigError(ValueError):
    """A config field holds an impossible value; the message names the field."""


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field `{field}`: {message}")


def validate_model_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns `cfg` unchanged, or raises ConfigError naming the first impossible field."""
    for part in ("vit", "adapter", "llm", "tokens"):
        _require(part in cfg, part, "missing section")
    vit, ad, llm = cfg.vit, cfg.adapter, cfg.llm
    for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "mlp_dim", "patch_size", "image_size"):
        _require(isinstance(vit[name], int) and vit[name] > 0, f"vit.{name}", f"must be a positive int, got {vit[name]!r}")
    _require(vit.image_size % vit.patch_size == 0, "vit.image_size",
             f"{vit.image_size} is not a multiple of vit.patch_size={vit.patch_size}")
    _require(vit.num_channels == 3, "vit.num_channels", f"must be 3 (RGB), got {vit.num_channels}")
    layers = tuple(ad.feature_layers)
    _require(len(layers) > 0, "adapter.feature_layers", "must name at least one ViT block")
    for layer in layers:
        _require(isinstance(layer, int) and 0 <= layer < vit.num_layers, "adapter.feature_layers",
                 f"{layers} must be 0-based block indices below vit.num_layers={vit.num_layers}")
    _require(ad.pool_size in (1, 2, 3, 4), "adapter.pool_size", f"must be 1..4, got {ad.pool_size}")
    for name in ("num_heads", "head_dim", "mlp_dim"):
        _require(isinstance(ad[name], int) and ad[name] > 0, f"adapter.{name}", f"must be a positive int, got {ad[name]!r}")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size"):
        _require(isinstance(llm[name], int) and llm[name] > 0, f"llm.{name}", f"must be a positive int, got {llm[name]!r}")
    _require(llm.num_heads % llm.num_kv_heads == 0, "llm.num_kv_heads",
             f"llm.num_heads={llm.num_heads} is not a multiple of llm.num_kv_heads={llm.num_kv_heads}")
    _require(llm.head_dim % 2 == 0, "llm.head_dim", f"RoPE needs an even head_dim, got {llm.head_dim}")
    _require(llm.additional_vocab_size >= 0, "llm.additional_vocab_size", "must be >= 0")
    _require(llm.qk_norm_type in ("qwen3", "olmo"), "llm.qk_norm_type", f"must be 'qwen3' or 'olmo', got {llm.qk_norm_type!r}")
    _require(llm.rope_type in ROPE_TYPES, "llm.rope_type", f"must be one of {ROPE_TYPES}, got {llm.rope_type!r}")
    _require(llm.rope_factor > 0, "llm.rope_factor", "must be > 0")
    for layer in tuple(llm.rope_scaling_layers):
        _require(0 <= layer < llm.num_layers, "llm.rope_scaling_layers",
                 f"{tuple(llm.rope_scaling_layers)} must index the {llm.num_layers} LLM layers")
    vocab_total = llm.vocab_size + llm.additional_vocab_size
    for name, value in cfg.tokens.items():
        _require(0 <= value < vocab_total, f"tokens.{name}",
                 f"id {value} is outside the embedding table of {vocab_total} rows")
    if "stts" in cfg:
        validate_stts_config(cfg)
    _require(cfg.dtype in ("float32", "bfloat16"), "dtype", f"must be float32 or bfloat16, got {cfg.dtype!r}")
    _require(cfg.param_dtype in ("float32", "bfloat16"), "param_dtype", f"must be float32 or bfloat16, got {cfg.param_dtype!r}")
    return cfg


def validate_stts_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first impossible STTS field of a model config."""
    st = cfg.stts
    _require(st.method in STTS_METHODS, "stts.method", f"must be one of {STTS_METHODS}, got {st.method!r}")
    if st.method == "none":
        return  # pruning off: the other knobs are unused
    _require(0.0 <= st.prune_ratio < 1.0, "stts.prune_ratio", f"must be in [0, 1), got {st.prune_ratio}")
    _require(isinstance(st.prune_at, int) and 0 <= st.prune_at < cfg.vit.num_layers - 1, "stts.prune_at",
             f"must be in [0, vit.num_layers - 1 = {cfg.vit.num_layers - 1}) so that block prune_at + 1 exists, "
             f"got {st.prune_at}")
    _require(st.pool_size == cfg.adapter.pool_size, "stts.pool_size",
             f"{st.pool_size} does not match adapter.pool_size={cfg.adapter.pool_size} (a window must be one LLM token)")
    _require(st.aux_loss_weight >= 0, "stts.aux_loss_weight", f"must be >= 0, got {st.aux_loss_weight}")
    _require(0.0 < st.bias_floor <= 1.0, "stts.bias_floor", f"must be in (0, 1], got {st.bias_floor}")
    _require(isinstance(st.prune_from_frame, int) and st.prune_from_frame >= 0, "stts.prune_from_frame",
             f"must be an int >= 0, got {st.prune_from_frame!r}")
    _require(st.rescale_scope in ("frame", "row"), "stts.rescale_scope", f"must be 'frame' or 'row', got {st.rescale_scope!r}")
    _require(st.pairing in ("per-video", "flat"), "stts.pairing", f"must be 'per-video' or 'flat', got {st.pairing!r}")
    _require(st.aux_target_grad in ("stop", "pass"), "stts.aux_target_grad",
             f"must be 'stop' or 'pass', got {st.aux_target_grad!r}")
    _require(st.execution in ("masked", "packed"), "stts.execution", f"must be 'masked' or 'packed', got {st.execution!r}")
    _require(0.0 <= st.pack_slack <= 1.0, "stts.pack_slack", f"must be in [0, 1], got {st.pack_slack}")
    _require(not st.refill, "stts.refill", "refill (ViT context for lonely frames) is not implemented; use False")


DATA_KINDS = ("random", "video")  # random: synthetic batches, no files; video: prepared video-QA records
SAMPLERS = ("uniform_last_frame", "transformers")  # frame samplers of stts_jax.data.video
ON_BAD_VIDEO = ("skip", "fail")
PARAM_GROUPS = ("vit", "adapter", "llm", "scorer")  # optimizer groups (one learning rate each)


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Returns the one data section: a training config's `data`, consumed as is by the video pipeline
    (stts_jax.data.pipeline.make_pipeline) and by evaluation. Every shape-deciding field is a Python int."""
    cfg = ml_collections.ConfigDict(dict(
        kind="random",  # random (no data needed) | video (prepared video-QA records, stts_jax.data)
        path="",  # tfds data dir holding video_qa/<version>/ (or that version dir itself)
        split="train",
        tokenizer="",  # tokenizer.json (or a directory holding one); "" = look in `path` and its parents
        num_frames=64,  # T: frames sampled per video (static; short clips repeat frames)
        max_fps=2.0,
        sampler="uniform_last_frame",  # | "transformers"
        videos_per_batch=8,  # video slots per (micro-)batch over all hosts: videos_per_batch / rows per row
        rows=8,  # packed rows (sequences) per (micro-)batch over all hosts
        seq_len=8192,  # tokens per packed row
        packing_bins=0,  # rows packed at once (first-fit); 0 = 2 * rows per host
        shuffle=True,
        shuffle_seed=0,
        num_epochs=None,  # None = repeat forever (training); evaluation reads 1
        workers=0,  # decoding processes (Grain mp_prefetch); 0 = decode in this process
        worker_buffer=2,  # examples buffered per worker
        read_threads=1,  # decoding threads per process (0 = decode on the consuming thread)
        read_buffer=4,  # examples decoded ahead per process
        host_prefetch=2,  # finished batches prepared ahead on a thread (0 = off)
        decode_threads=1,  # FFmpeg threads per decode
        decode_timeout_s=600.0,  # > 0: decode each video in a child process within this time (0: in this process)
        decode_memory_gb=8.0,  # ... and this much memory; past either, the example is a counted skip
        on_bad_video="skip",  # skip (count and report) | fail
        max_consecutive_bad=16,  # skipping: this many bad examples in a row stop the run ...
        max_bad_fraction=0.25,  # ... and so does a larger share of bad examples, once bad_fraction_after were read
        bad_fraction_after=64,
        answer_len=4,  # random data only
        empty_slots=0.0,  # random data only: share of video slots left empty (zeros, frame_mask 0), anywhere in a row
    ))
    _check_data_fields(overrides, cfg)
    cfg.update(overrides)
    return cfg


# the pipeline's former field names (before the one data section), refused with the name that replaced them
RENAMED_DATA_FIELDS = dict(data_dir="path", num_workers="workers", seed="shuffle_seed", on_error="on_bad_video",
                           videos_per_row="videos_per_batch (= rows x videos per row)")


def _check_data_fields(fields, known) -> None:
    for name in fields:
        if name not in known:
            hint = (f"; it is now `data.{RENAMED_DATA_FIELDS[name]}`" if name in RENAMED_DATA_FIELDS
                    else f"; the fields are {', '.join(sorted(known))}")
            raise ConfigError(f"config field `data.{name}`: unknown{hint}")


def _is_url(path) -> bool:
    """A URL (gs://, s3://, ...), not a local path (stts_jax.paths.is_remote; config imports nothing of ours)."""
    return "://" in str(path or "") and not str(path).startswith("file://")


def remote_data_message(path) -> str:
    """Why a prepared dataset cannot be read from a URL, and what to do instead."""
    return (f"{path!r} is a URL: ArrayRecord's reader (under tfds and Grain) opens local files only; mount the bucket "
            "with Cloud Storage FUSE (launch/tpu/install.sh --gcsfuse_bucket=BUCKET mounts it at /gcs/BUCKET) and "
            "use the mounted directory")


def validate_data_config(data: ml_collections.ConfigDict, prefix: str = "data.") -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first impossible field of a data section (`prefix` + name); returns it."""
    def need(cond, name, message):
        _require(cond, prefix + name, message)

    _check_data_fields(data, data_config())
    need(data.kind in DATA_KINDS, "kind", f"must be one of {DATA_KINDS}, got {data.kind!r}")
    need(data.num_frames >= 1 and data.videos_per_batch >= 1 and data.rows >= 1, "num_frames",
         "num_frames, videos_per_batch and rows must be >= 1")
    need(data.videos_per_batch % data.rows == 0, "videos_per_batch",
         f"{data.videos_per_batch} video slots do not split evenly over {prefix}rows={data.rows} rows "
         "(every row holds videos_per_batch / rows slots)")
    need(data.seq_len >= 1, "seq_len", f"must be >= 1, got {data.seq_len}")
    need(data.kind == "random" or not _is_url(data.path), "path", remote_data_message(data.path))
    need(data.sampler in SAMPLERS, "sampler", f"must be one of {SAMPLERS}, got {data.sampler!r}")
    need(data.on_bad_video in ON_BAD_VIDEO, "on_bad_video", f"must be one of {ON_BAD_VIDEO}, got {data.on_bad_video!r}")
    need(data.num_epochs is None or data.num_epochs >= 1, "num_epochs", f"must be None or >= 1, got {data.num_epochs}")
    need(data.workers >= 0, "workers", f"must be >= 0, got {data.workers}")
    need(data.max_consecutive_bad >= 1 and 0.0 < data.max_bad_fraction <= 1.0 and data.bad_fraction_after >= 1,
         "max_consecutive_bad", "max_consecutive_bad (>= 1), max_bad_fraction (in (0, 1]) and bad_fraction_after "
         f"(>= 1): got {data.max_consecutive_bad}, {data.max_bad_fraction}, {data.bad_fraction_after}")
    return data


def validate_train_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first impossible field of a training config (before any work)."""
    import os

    for section in ("model", "data", "mesh", "optim", "train"):
        _require(section in cfg, section, "missing section")
    validate_model_config(cfg.model)
    tr, data, optim = cfg.train, cfg.data, cfg.optim
    mesh = cfg.mesh
    _require(set(mesh.keys()) <= {"data", "fsdp", "tensor", "slices"}, "mesh",
             f"unknown field(s) {sorted(set(mesh.keys()) - {'data', 'fsdp', 'tensor', 'slices'})}")
    _require(all(isinstance(mesh.get(k, 1), int) for k in ("data", "fsdp", "tensor", "slices")), "mesh",
             "data, fsdp, tensor and slices must be integers")
    _require(mesh.get("slices", 1) >= 1, "mesh.slices", f"must be >= 1 (1 = one slice), got {mesh.get('slices')}")
    _require(mesh.data == -1 or mesh.fsdp == 0 or mesh.data % mesh.get("slices", 1) == 0, "mesh.data",
             f"must be -1 or a multiple of mesh.slices={mesh.get('slices')} (the data axis spans the slices), "
             f"got {mesh.data}")
    _require(tr.steps > 0, "train.steps", f"must be > 0, got {tr.steps}")
    _require(tr.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {tr.grad_accum}")
    _require(tr.log_every >= 1 and tr.ckpt_every >= 1 and tr.keep_ckpts >= 1, "train.log_every",
             "log_every, ckpt_every and keep_ckpts must be >= 1")
    _require(tr.max_nonfinite >= 1, "train.max_nonfinite", f"must be >= 1, got {tr.max_nonfinite}")
    _require(tr.keep_period >= 0 and tr.keep_period % tr.ckpt_every == 0, "train.keep_period",
             f"must be 0 (off) or a multiple of train.ckpt_every={tr.ckpt_every}, got {tr.keep_period}")
    for group in tuple(optim.freeze):
        _require(group in PARAM_GROUPS, "optim.freeze", f"unknown group {group!r}; groups are {PARAM_GROUPS}")
    _require(data.get("kind") in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}, got {data.get('kind')!r}")
    if data.kind != "random":
        _require(bool(data.path) and (_is_url(data.path) or os.path.exists(data.path)), "data.path",
                 f"dataset path {data.path!r} does not exist")
    validate_data_config(data)
    _require(data.kind == "random" or data.num_epochs is None, "data.num_epochs",
             f"training repeats the data (None); got {data.num_epochs} (a finite count would end the input mid-run)")
    if tr.init_from:
        _require(_is_url(tr.init_from) or os.path.isdir(tr.init_from), "train.init_from",
                 f"checkpoint directory {tr.init_from!r} does not exist")  # a gs:// one is checked when loaded
    _require(tr.get("eval_every", 0) >= 0, "train.eval_every", f"must be >= 0 (0 = off), got {tr.get('eval_every')}")
    if tr.get("eval_every", 0):
        _require(data.kind == "video", "train.eval_every",
                 f"evaluation during training reads a split of data.path; data.kind={data.kind!r} has none")
        _require(tr.get("eval_max_examples", 0) >= 0, "train.eval_max_examples", "must be >= 0 (0 = the whole split)")
    _require(tr.get("lease_stale_s", 300.0) > 0, "train.lease_stale_s", f"must be > 0, got {tr.get('lease_stale_s')}")
    profile_range(cfg)


def profile_range(cfg: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """Returns train.profile_steps as (first, last) 1-based steps, None when off; ConfigError when malformed."""
    spec = str(cfg.train.get("profile_steps", "") or "").strip()
    if not spec:
        return None
    try:
        first, last = (int(x) for x in spec.split(","))
    except ValueError:
        raise ConfigError(f"config field `train.profile_steps`: expected 'first,last' (two step numbers), got "
                          f"{spec!r}") from None
    _require(1 <= first <= last <= cfg.train.steps, "train.profile_steps",
             f"need 1 <= first <= last <= train.steps={cfg.train.steps}, got {first},{last}")
    return first, last


def train_config(model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Returns a full training config (model, data, mesh, optim, train) with the paper's optimizer defaults."""
    return ml_collections.ConfigDict(dict(
        model=model if model is not None else model_config(),
        data=data_config(),
        # -1 fills with the remaining devices; fsdp=0: the largest fsdp dividing every embed width; slices > 1:
        # multi-slice, the data axis spans that many slices over DCN (fsdp, tensor inside one; sharding.make_mesh)
        mesh=dict(data=-1, fsdp=1, tensor=1, slices=1),
        optim=dict(
            lr_vit=5e-6, lr_adapter=5e-6, lr_llm=1e-5, lr_scorer=1e-4,
            warmup_steps=200, final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
            grad_clip=1.0, freeze=(),
        ),
        train=dict(
            steps=6250, grad_accum=1, log_every=10, ckpt_every=500, keep_ckpts=3, seed=0,
            keep_period=0,  # > 0: checkpoints at multiples of it are never rotated away
            max_nonfinite=5,  # non-finite updates are skipped; a streak this long, seen at a log / ckpt step, stops
            init_from="",  # a Molmo2 checkpoint directory (scorer initialised fresh), or "" = from scratch
            eval_every=0,  # > 0: multiple-choice eval of data.path's eval_split every this many steps (and the last)
            eval_split="validation",
            eval_max_examples=0,  # 0 = the whole split
            profile_steps="",  # "a,b": a jax.profiler trace of steps a..b (1-based) in workdir/profile
            lease_stale_s=300.0,  # workdir/LEASE: a holder silent this long (or dead on this host) is taken over
        ),
    ))
