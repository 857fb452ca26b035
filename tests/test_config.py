import pytest

from raykd.config import ConfigError, DataConfig, dump_yaml, load_config


def test_defaults_load_without_a_file():
    cfg = load_config(DataConfig)
    assert cfg.splits.train == 0.7 and cfg.sampling.strategy == "none"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "data.yaml"
    f.write_text("path: /data/isic\nsynth:\n  num_images: 500\nsplits: {train: 0.8, val: 0.1, test: 0.1}\n")
    cfg = load_config(DataConfig, f, ["synth.image_size=64", "shard_mb=1e-1", "sampling.strategy=oversample"])
    assert cfg.path == "/data/isic"
    assert cfg.synth.num_images == 500 and cfg.synth.image_size == 64
    assert cfg.shard_mb == pytest.approx(0.1)  # YAML 1.1 reads 1e-1 as a string; floats accept it
    assert cfg.splits.train == 0.8 and cfg.sampling.strategy == "oversample"


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("synth:\n  num_imagez: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(DataConfig, f)
    msg = str(err.value)
    assert str(f) in msg and "synth.num_imagez" in msg and "Did you mean 'synth.num_images'" in msg
    assert "image_size" in msg  # lists the valid keys


def test_wrong_type_and_out_of_range_and_bad_choice_fail():
    with pytest.raises(ConfigError, match="synth.num_images must be an integer"):
        load_config(DataConfig, None, ["synth.num_images=many"])
    with pytest.raises(ConfigError, match=r"synth.image_size=4 is out of range \[16, 1024\]"):
        load_config(DataConfig, None, ["synth.image_size=4"])
    with pytest.raises(ConfigError, match="'oversample'"):
        load_config(DataConfig, None, ["sampling.strategy=smote"])
    with pytest.raises(ConfigError, match="generate_if_missing must be true or false"):
        load_config(DataConfig, None, ["generate_if_missing=3"])


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="must be 1.0"):
        load_config(DataConfig, None, ["splits.train=0.9"])


def test_bad_yaml_and_missing_file_are_clear(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DataConfig, f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DataConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(DataConfig, None, ["splits.train"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DataConfig, None, ["synth.seed=7"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(DataConfig, tmp_path / "resolved.yaml") == cfg


def test_elastic_scaling_needs_min_workers_at_most_num_workers():
    from raykd.config import RunConfig

    cfg = load_config(RunConfig, None, ["scaling.num_workers=4", "scaling.min_workers=2", "scaling.placement=spread"])
    assert (cfg.scaling.min_workers, cfg.scaling.placement) == (2, "spread")
    with pytest.raises(ConfigError, match=r"scaling.min_workers \(5\) must be <= scaling.num_workers \(4\)"):
        load_config(RunConfig, None, ["scaling.num_workers=4", "scaling.min_workers=5"])
    with pytest.raises(ConfigError, match="scaling.placement"):
        load_config(RunConfig, None, ["scaling.placement=everywhere"])
