"""Presets and overrides: frozen configs, typed, with clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dedup.config import PRESETS, EmbedConfig, EmbedModel, KeepPolicy, RunConfig, Verifier, load_config
from dedup.errors import ConfigError


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.search.report_thresholds == (0.95, 0.5)  # the paper's levels, whatever the preset


def test_strict_is_the_papers_duplicate_level() -> None:
    cfg = load_config("strict")
    assert cfg.search.threshold == 0.95 and cfg.embed.model is EmbedModel.SSCD


def test_default_is_the_measured_trade_off() -> None:
    """What bench/quality.py measured best (see configs/default.toml): the distilled model with
    the levers that paid for themselves, one worker per core."""
    cfg = load_config("default")
    assert cfg.embed.model is EmbedModel.SSCD_DISTILLED and cfg.embed.regions
    assert cfg.search.threshold == 0.9 and cfg.search.partial and cfg.embed.size == 224
    # below the threshold, a band of pairs is linked only when geometry confirms them
    assert cfg.search.verify_from == 0.55 and cfg.search.partial_propose == 0.35 and cfg.search.verify_by is Verifier.GEOMETRY
    assert cfg.search.verify_per_image == 10
    assert cfg.fingerprint.trim and cfg.fingerprint.pdq_dihedral
    assert cfg.workers == 0
    # the report keeps the paper's levels whatever the preset
    assert cfg.search.report_thresholds == (0.95, 0.5)


def test_overrides_are_typed_and_none_is_ignored() -> None:
    cfg = RunConfig().with_overrides({"search.threshold": 0.9, "keep.policy": "largest", "workers": None})
    assert cfg.search.threshold == 0.9 and cfg.keep.policy is KeepPolicy.LARGEST and cfg.workers == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 3  # type: ignore[misc]


def test_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'keep.policy' must be one of: first, largest, column"):
        RunConfig().with_overrides({"keep.policy": "best"})
    with pytest.raises(ConfigError, match="unknown setting 'search.nope'"):
        RunConfig().with_overrides({"search.nope": 1})
    f = tmp_path / "c.toml"
    f.write_text("[search]\nthreshold = 'high'\n")
    with pytest.raises(ConfigError, match="'search.threshold' must be a float"):
        load_config(path=f)
    f.write_text("[search\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path=f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(path=tmp_path / "missing.toml")


def test_stage_key_ignores_settings_that_do_not_change_features() -> None:
    base = RunConfig()
    assert base.stage_key() == base.with_overrides({"search.threshold": 0.5, "embed.batch_size": 7}).stage_key()
    assert base.stage_key() != base.with_overrides({"embed.model": "sscd_distilled"}).stage_key()


def test_batch_size_by_device() -> None:
    """0 (the default) picks the batch by device; a batch size given is kept."""
    assert EmbedConfig().batch() == EmbedConfig(device="CPU").batch() == 8  # as the embedders parse it
    assert EmbedConfig(device="cuda").batch() == EmbedConfig(device="cuda:1").batch() == 64
    assert EmbedConfig(batch_size=5, device="cuda").batch() == 5
    cfg = RunConfig().with_overrides({"embed.batch_size": 3})
    assert cfg.embed.batch() == 3 and cfg.stage_key() == RunConfig().stage_key()  # speed only
