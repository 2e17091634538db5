"""Presets and overrides: frozen configs, typed, with clear errors."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dedup.config import PRESETS, EmbedConfig, EmbedModel, KeepPolicy, RunConfig, Verifier, load_config, preset_path, to_dict
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


def test_auto_pool_threads_only_without_a_model() -> None:
    """pool = "auto" (the default): threads where the per-shard step loads no model (the hash
    path: a spawned worker would pay its own Python and imports for hashing alone), worker
    processes where it loads one; "threads" and "processes" hold whatever the model."""
    default = load_config("default")
    assert default.pool == "auto" and not default.local_threads()
    assert default.with_overrides({"embed.model": "none"}).local_threads()
    assert not default.with_overrides({"embed.model": "none", "pool": "processes"}).local_threads()
    assert default.with_overrides({"pool": "threads"}).local_threads()
    with pytest.raises(ConfigError):
        RunConfig().with_overrides({"pool": "fibres"})


def test_overrides_are_typed_and_none_is_ignored() -> None:
    cfg = RunConfig().with_overrides({"search.threshold": 0.8, "keep.policy": "largest", "workers": None})
    assert cfg.search.threshold == 0.8 and cfg.keep.policy is KeepPolicy.LARGEST and cfg.workers == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 3  # type: ignore[misc]


def test_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'keep.policy' must be one of: first, largest, column"):
        RunConfig().with_overrides({"keep.policy": "best"})
    with pytest.raises(ConfigError, match="unknown setting 'search.nope'"):
        RunConfig().with_overrides({"search.nope": 1})
    with pytest.raises(ConfigError, match="unknown setting 'nope.threshold'"):
        RunConfig().with_overrides({"nope.threshold": 1})
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
    assert base.stage_key() != base.with_overrides({"embed.model": "sscd"}).stage_key()


def test_batch_size_by_device() -> None:
    """0 (the default) picks the batch by device; a batch size given is kept."""
    assert EmbedConfig().batch() == EmbedConfig(device="CPU").batch() == 8  # as the embedders parse it
    assert EmbedConfig(device="cuda").batch() == EmbedConfig(device="cuda:1").batch() == 64
    assert EmbedConfig(batch_size=5, device="cuda").batch() == 5
    cfg = RunConfig().with_overrides({"embed.batch_size": 3})
    assert cfg.embed.batch() == 3 and cfg.stage_key() == RunConfig().stage_key()  # speed only


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _preset_keys(name: str) -> dict[str, Any]:
    data = tomllib.loads(preset_path(name).read_text(encoding="utf-8"))
    data.pop("description")
    return _flat(data)


def test_the_library_default_is_the_default_preset() -> None:
    """RunConfig() is what `dedup run` does without options: every key configs/default.toml
    names has the dataclass default's value, and the loaded preset equals RunConfig() whole."""
    defaults = _flat(to_dict(RunConfig()))
    listed = _preset_keys("default")
    assert len(listed) >= 15  # the file documents the defaults, not an empty table
    mismatched = {key: (value, defaults.get(key, "<no such setting>")) for key, value in listed.items() if defaults.get(key) != value}
    assert mismatched == {}, "configs/default.toml (left) and RunConfig() (right) disagree"
    assert load_config("default") == RunConfig()
    assert to_dict(load_config()) == to_dict(RunConfig())


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_is_the_default_with_only_its_keys_changed(name: str) -> None:
    """Field by field: a preset differs from the default exactly where its file says so."""
    loaded = _flat(to_dict(load_config(name)))
    default = _flat(to_dict(RunConfig()))
    listed = _preset_keys(name)
    for key, value in loaded.items():
        if key in listed:
            assert value == listed[key], key
        else:
            assert value == default[key], f"{name}: {key} is {value!r}, the default's is {default[key]!r}, and the file does not name it"


def test_ci_inherits_the_default_signals() -> None:
    """ci gates drops with the default's signals (model, size, trim, PDQ in any orientation,
    the second look, partial copies); only direct links start higher, at 0.95."""
    ci, default = load_config("ci"), load_config("default")
    assert ci.fingerprint == default.fingerprint and ci.embed == default.embed and ci.workers == default.workers
    assert ci.search == dataclasses.replace(default.search, threshold=0.95)
    assert ci.search.verify_from == 0.55 and ci.search.partial and ci.embed.regions and ci.fingerprint.trim


def test_strict_turns_off_what_it_does_not_want() -> None:
    """strict names every default lever it does not use, since it starts from the default."""
    cfg = load_config("strict")
    assert cfg.search.verify_from < 0 and not cfg.search.partial and not cfg.embed.regions
    assert not cfg.fingerprint.trim and not cfg.fingerprint.pdq_dihedral
    assert (cfg.embed.model, cfg.embed.size, cfg.search.pdq_distance) == (EmbedModel.SSCD, 288, 16)


def test_a_config_file_changes_only_its_keys_over_the_chosen_preset(tmp_path: Path) -> None:
    """--config lays its keys over --preset; everything it does not name stays the preset's."""
    f = tmp_path / "mine.toml"
    f.write_text('description = "mine"\n[search]\nthreshold = 0.8\n[keep]\npolicy = "largest"\n')
    for preset in PRESETS:
        base = load_config(preset)
        mine = load_config(preset, f)
        assert mine == dataclasses.replace(
            base,
            search=dataclasses.replace(base.search, threshold=0.8),
            keep=dataclasses.replace(base.keep, policy=KeepPolicy.LARGEST),
        ), preset
    # strict stays strict at 0.8: no second look, no trim, full SSCD (not the default's levers)
    strict = load_config("strict", f)
    assert strict.search.verify_from < 0 and not strict.fingerprint.trim and strict.embed.model is EmbedModel.SSCD
    # a nested value is replaced, not merged: the table's other keys stay the preset's
    f.write_text("[embed]\nregion_scales = [0.5]\n")
    assert load_config("aggressive", f).embed == dataclasses.replace(load_config("aggressive").embed, region_scales=(0.5,))
    # errors name the key and the file's problem, as for presets
    f.write_text("[search]\nthreshhold = 0.8\n")
    with pytest.raises(ConfigError, match="unknown setting 'search.threshhold'"):
        load_config("strict", f)
    f.write_text("inherit = 'strict'\n")
    with pytest.raises(ConfigError, match="unknown setting 'inherit'"):
        load_config("default", f)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config("default", tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'laxest'"):
        load_config("laxest", f)
