from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipelines.core.config import (
    DEFAULT_CONFIG,
    ConfigError,
    SynprefConfig,
    describe,
    load_config,
    masked,
)


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


def test_a_bad_secret_value_names_its_key_but_not_the_value():
    options = {"storage_options": {"AWS_SECRET_ACCESS_KEY": ["s3cr3t"]}}
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY") as error:
        load_config(None, {"lake": options})
    assert "s3cr3t" not in str(error.value)


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


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any, type]]:
    """(dotted name, field info, owning section) of every field, sections and list items too."""
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info, model
        for kind in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _fields(kind, f"{prefix}{name}.")


def test_every_config_field_is_documented():
    undocumented = [
        name
        for name, info, _ in _fields(SynprefConfig)
        if not info.description
        and not (isinstance(info.annotation, type) and info.annotation.__doc__)
    ]
    assert undocumented == []


def test_local_yaml_holds_only_what_differs_from_the_defaults():
    given = yaml.safe_load(DEFAULT_CONFIG.read_text())
    defaults = SynprefConfig().model_dump(mode="json")

    def same(values: dict, base: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                found += same(value, base[key], f"{prefix}{key}.")
            elif value == base.get(key):
                found.append(f"{prefix}{key}")
        return found

    assert same(given, defaults) == [], "repeats a default: leave it to the field"


def test_synpref_config_shows_each_field_with_its_documentation():
    from click.testing import CliRunner

    from ray_jobs.cli import cli

    out = CliRunner().invoke(cli, ["config"], catch_exceptions=False).output
    assert "# Word n-gram size of the shingles.\ndedup.minhash.ngram: 3" in out
    assert "\ntraining.workers: 2  # operational\n" in out, "a loop resumes across it"
    assert "\ntraining.learning_rate: 0.0002\n" in out
    assert "judging.judges[0].name:" in out
    assert 'demo.extra_inputs: {"hh-rlhf-harmless"' in out


def test_secrets_are_masked_when_the_config_is_shown():
    config = SynprefConfig(lake={"storage_options": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}})
    shown = "\n".join(describe(config))
    assert "s3cr3t" not in shown and '"AWS_SECRET_ACCESS_KEY": "***"' in shown
    dumped = masked(config.model_dump(mode="json"))
    assert dumped["lake"]["storage_options"] == {"AWS_SECRET_ACCESS_KEY": "***"}
    assert dumped["training"]["micro_batch_tokens"] == 2048, "not every *_tokens is a secret"
