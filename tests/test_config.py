"""The one data section and the training validator (stts_jax/config.py): bad, unknown and renamed fields are
refused by name before any work starts."""

import pytest

from stts_jax.config import ConfigError, data_config, train_config, validate_data_config, validate_train_config


@pytest.mark.parametrize("old,new", [("data_dir", "data.path"), ("num_workers", "data.workers"),
                                     ("seed", "data.shuffle_seed"), ("on_error", "data.on_bad_video"),
                                     ("videos_per_row", "data.videos_per_batch")])
def test_the_pipelines_former_field_names_are_refused_with_their_new_names(old, new):
    with pytest.raises(ConfigError, match=rf"`data\.{old}`: unknown; it is now `{new}"):
        data_config(**{old: 1})


def test_data_section_validation_names_the_field():
    data = data_config()
    data.typo_field = 3
    with pytest.raises(ConfigError, match=r"`data\.typo_field`: unknown; the fields are .*videos_per_batch"):
        validate_data_config(data)
    for field, value, needle in [("videos_per_batch", 12, r"`data\.videos_per_batch`: 12 video slots"),
                                 ("sampler", "every_other", r"`data\.sampler`: must be one of"),
                                 ("on_bad_video", "ignore", r"`data\.on_bad_video`: must be one of"),
                                 ("kind", "images", r"`data\.kind`: must be one of")]:
        data = data_config(rows=8)
        data[field] = value
        with pytest.raises(ConfigError, match=needle):
            validate_data_config(data)


def test_training_repeats_its_video_data(tmp_path):
    cfg = train_config()
    cfg.data.update(kind="video", path=str(tmp_path), num_epochs=2)
    with pytest.raises(ConfigError, match=r"`data\.num_epochs`: training repeats the data \(None\); got 2"):
        validate_train_config(cfg)
    cfg.data.num_epochs = None
    validate_train_config(cfg)


def test_mesh_section_is_checked_before_any_work():
    from configs import tiny_train

    for update, needle in [(dict(slices=0), r"`mesh\.slices`: must be >= 1"),
                           (dict(data=3, slices=2), r"`mesh\.data`: must be -1 or a multiple of mesh\.slices=2")]:
        cfg = tiny_train.get_config("scorer")
        cfg.mesh.update(update)
        with pytest.raises(ConfigError, match=needle):
            validate_train_config(cfg)
    cfg = tiny_train.get_config("scorer")
    cfg.mesh.unlock()
    cfg.mesh.replicas = 2
    with pytest.raises(ConfigError, match=r"`mesh`: unknown field\(s\) \['replicas'\]"):
        validate_train_config(cfg)


def test_two_slices_on_one_process_are_refused_by_the_trainer(tmp_path):
    """One process has one granule (CPU devices carry no slice_index): mesh.slices=2 is refused naming what the
    devices form, before any compilation."""
    from configs import tiny_train

    from stts_jax.train.trainer import train

    cfg = tiny_train.get_config("scorer")
    cfg.mesh.update(slices=2)
    with pytest.raises(ConfigError, match=r"`mesh`: slices=2, but the 8 devices form 1 process\(es\)"):
        train(cfg, str(tmp_path / "run"))
