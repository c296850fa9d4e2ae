"""Hydra composition steered by Flower's run config, and the flat spec shipped to the sites."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from reid.config import SiteRunSpec
from server.config import CONF_DIR, compose_config, federation_settings, hydra_overrides, site_run_spec
from strategies.screening import ScreenSpec


def test_defaults_are_the_gpu_setup_of_the_reference() -> None:
    cfg = compose_config({})
    spec = site_run_spec(cfg)
    assert (spec.model.backbone, spec.model.height, spec.model.width) == ("resnet50", 256, 128)
    assert spec.train.lr == 0.05 and spec.train.backbone_lr_mult == 0.1 and spec.train.batch_size == 32
    assert spec.bn_stats == "local" and cfg.algorithm.name == "fedpav"


def test_run_config_selects_profile_and_overrides_win() -> None:
    run_config = {"algorithm": "fedpav", "profile": "demo", "output-dir": "/tmp/x",
                  "overrides": "federation.rounds=7 train.local_epochs=2 algorithm.bn_stats=average"}
    assert hydra_overrides(run_config)[:3] == ["algorithm=fedpav", "profile=demo", "output.dir=/tmp/x"]
    cfg = compose_config(run_config)
    settings = federation_settings(cfg)
    demo = OmegaConf.load(CONF_DIR / "profile" / "demo.yaml")
    assert cfg.model.backbone == "resnet10" and settings.rounds == 7  # override beats the profile
    assert settings.eval_every == demo.federation.eval_every  # the profile beats config.yaml
    assert site_run_spec(cfg).train.local_epochs == 2 and site_run_spec(cfg).bn_stats == "average"
    assert cfg.output.dir == "/tmp/x"


def test_evaluation_schedule_every_k_rounds_and_after_the_last() -> None:
    settings = federation_settings(compose_config({"overrides": "federation.rounds=7 federation.eval_every=3"}))
    assert [r for r in range(1, 8) if settings.evaluates_after(r)] == [3, 6, 7]


def test_unknown_names_fail_loudly() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config({"algorithm": "fedmagic"})
    with pytest.raises(ValueError, match="bn_stats"):
        site_run_spec(compose_config({"overrides": "algorithm.bn_stats=median"}))


def test_flat_spec_round_trips_including_unset_fields() -> None:
    spec = site_run_spec(compose_config({"profile": "demo"}))
    flat = spec.to_flat()
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert flat["augment.pad"] == ""
    assert SiteRunSpec.from_flat({**flat, "server-round": 4}) == spec


PRESET_FILES = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_every_preset_composes_into_a_site_spec_and_screens_wild_updates(preset: str) -> None:
    cfg = compose_config({"algorithm": preset})
    assert cfg.algorithm.name == preset
    site_run_spec(cfg)  # every knob a site receives is valid
    screen = ScreenSpec(**OmegaConf.to_container(cfg.algorithm.screen, resolve=True))
    assert screen.enabled and screen.action == "reject"


def test_the_cdw_and_kd_presets_switch_on_what_their_names_say() -> None:
    cdw, kd = compose_config({"algorithm": "fedpav_cdw"}).algorithm, compose_config({"algorithm": "fedpav_kd"}).algorithm
    both = compose_config({"algorithm": "fedpav_cdw_kd"}).algorithm
    assert (cdw.weighting, cdw.kd.enabled) == ("cdw", False)
    assert (kd.weighting, kd.kd.enabled) == ("size", True)
    assert (both.weighting, both.kd.enabled) == ("cdw", True)


def test_sites_measure_their_change_only_where_the_aggregation_weights_read_it() -> None:
    from server.app import build_strategy, measures_change

    measured = {name: measures_change(build_strategy(compose_config({"algorithm": name})))
                for name in ("fedpav", "feddg", "fedpav_cdw", "fedklpr", "fedklpr_no_klaw")}
    assert measured == {"fedpav": False, "feddg": False, "fedpav_cdw": True, "fedklpr": True, "fedklpr_no_klaw": True}


def test_the_fedureid_presets_differ_only_in_their_personalisations() -> None:
    def unsupervised(name: str) -> dict:
        cfg = compose_config({"algorithm": name, "overrides": "federation.rounds=7"})
        spec = site_run_spec(cfg).unsupervised
        assert spec.enabled and spec.rounds == 7 and cfg.algorithm.weighting == "size"
        return {**spec.__dict__, "clustering": cfg.algorithm.clustering.method}

    plain, personal, alone = (unsupervised(n) for n in ("fedureid_no_personalization", "fedureid", "local_unsupervised"))
    assert {k for k in plain if plain[k] != personal[k]} == {"merge", "dynamic_epochs", "update"}
    assert (plain["merge"], plain["dynamic_epochs"], plain["update"]) == ("fixed", False, "none")
    assert {k for k in alone if alone[k] != personal[k]} == {"clustering"} and alone["clustering"] == "singletons"


@pytest.mark.parametrize("override", ["algorithm.weighting=cdw", "algorithm.kd.enabled=true",
                                      "algorithm.pruning.enabled=true", "algorithm.clustering.method=kmeans"])
def test_fedureid_refuses_what_needs_labels_or_a_classifier(override: str) -> None:
    with pytest.raises(ValueError, match="unsupervised training does not combine with"):
        site_run_spec(compose_config({"algorithm": "fedureid", "overrides": override}))
