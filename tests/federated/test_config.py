"""A federated run's settings travel as Flower run config: flat keys of bool, int, float and str."""

from __future__ import annotations

from pathlib import Path

import pytest

from fortify.errors import ConfigError
from fortify.federated.config import FederatedRun, load_federated_run

LISTS = {"eval": {"attacks": ["pgd", "square"], "eps_grid": [0.1, 0.2],
                  "attack_options": {"square": {"sizes": [2, 4]}}}}


def test_list_settings_travel_as_json_and_come_back_as_lists():
    # Prepare / Execute: before, the lists were dropped and the run held the defaults ['fgsm', 'pgd'], None
    run = load_federated_run(None, LISTS, {"clients": 2})
    flat = run.to_run_config()
    # Assert
    assert (run.config.eval.attacks, run.config.eval.eps_grid) == (["pgd", "square"], [0.1, 0.2])
    assert run.config.eval.attack_options == {"square": {"sizes": [2, 4]}}
    assert flat["eval.attacks"] == '["pgd", "square"]'
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert FederatedRun.from_run_config(flat) == run


def test_a_list_given_as_flower_run_config_is_read_and_a_string_that_looks_like_one_stays_a_string():
    flat = load_federated_run(None, {}, {}).to_run_config()
    # what `flwr run --run-config "eval.attacks='[\"square\"]'"` hands the apps
    run = FederatedRun.from_run_config({**flat, "eval.attacks": '["square"]', "data.path": "[1, 2]"})
    assert run.config.eval.attacks == ["square"]
    assert run.config.data.path == Path("[1, 2]")


def test_a_list_setting_that_is_not_a_json_list_is_refused_by_name():
    flat = load_federated_run(None, {}, {}).to_run_config()
    with pytest.raises(ConfigError, match=r"eval.attacks: Input should be a valid list \(got '\[pgd'\)"):
        FederatedRun.from_run_config({**flat, "eval.attacks": "[pgd"})
