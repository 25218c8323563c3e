from pathlib import Path

import pytest

from pipelines.core.config import ConfigError, load_config


def test_defaults_are_the_embedded_local_setup():
    config = load_config()
    assert config.lake.root == "./lake"
    assert config.tracking.uri == "sqlite:///mlruns.db"
    assert config.ray.address is None


def test_environment_overrides_the_file_and_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SYNPREF_LAKE__ROOT", "s3://bucket/lake")
    monkeypatch.setenv("SYNPREF_INGEST__MAX_CHARS", "500")
    config = load_config()
    assert config.lake.root == "s3://bucket/lake"
    assert config.ingest.max_chars == 500
    flagged = load_config(None, {"lake": {"root": "/data/lake"}})
    assert flagged.lake.root == "/data/lake"
    assert flagged.ingest.max_chars == 500


def test_a_bad_value_names_its_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingest:\n  max_chars: lots\n")
    with pytest.raises(ConfigError, match=r"config key 'ingest.max_chars'.*'lots'"):
        load_config(path)


def test_a_bad_environment_value_names_its_key(monkeypatch):
    monkeypatch.setenv("SYNPREF_INGEST__BINARIZE", "coin_flip")
    with pytest.raises(ConfigError, match="config key 'ingest.binarize'"):
        load_config()


def test_an_unknown_key_is_an_error_not_ignored(tmp_path: Path):
    path = tmp_path / "typo.yaml"
    path.write_text("lake:\n  rooot: ./x\n")
    with pytest.raises(ConfigError, match="config key 'lake.rooot'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("lake: [unclosed", "not valid YAML"), ("- a\n- b\n", "must hold a mapping")],
)
def test_malformed_files_are_reported(tmp_path: Path, text: str, message: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_is_reported(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_bad_flag_value_names_its_key():
    with pytest.raises(ConfigError, match="config key 'ray.num_cpus'"):
        load_config(None, {"ray": {"num_cpus": 0}})


def test_without_the_checkout_the_field_defaults_apply(monkeypatch, tmp_path):
    import pipelines.core.config as config_module

    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", tmp_path / "absent.yaml")
    assert load_config().lake.root == "./lake"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
