"""Sweeps on Ray Tune: every trial a TorchTrainer run on one cached reference pass."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpo_ray.cli import main
from dpo_ray.config import RunConfig, build_config, config_dict, save_config


def _tree(**sweep) -> dict:
    return {"data": {"source": "x.jsonl", "tokenizer": "t"}, "reference": {"model": "m"},
            "train": {"eval_fraction": 0.2}, "sweep": sweep}


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"betta": [0.1]}}, "sweep.grid: 'betta' is not a train field a sweep can vary"),
    ({"grid": {"run_name": ["a"]}}, "'run_name' is not a train field a sweep can vary"),
    ({"grid": {"beta": [0.1, -1]}}, "sweep trial {'beta': -1}: train.beta: Input should be greater than 0"),
    ({"grid": {"beta": []}}, "sweep.grid.beta: List should have at least 1 item"),
    ({"random": {"learning_rate": {"loguniform": [0, 1e-4]}}}, "loguniform: low must be > 0"),
    ({"random": {"learning_rate": {"loguniform": [1e-3, 1e-4]}}}, "low < high"),
    ({"random": {"learning_rate": {"normal": [0, 1]}}}, "give exactly one of"),
    ({"random": {"label_smoothing": {"uniform": [0.0, 0.6]}}}, "train.label_smoothing"),  # ends checked
    ({}, "sweep: nothing to vary"),
    ({"grid": {"beta": [0.1]}, "random": {"beta": {"choice": [0.2]}}}, "in both grid and random"),
    ({"grid": {"peft.rank": [4]}}, "train.peft.rank: Unexpected keyword argument"),
])
def test_every_trial_setting_is_checked_before_ray(sweep, message):
    with pytest.raises(ValueError, match="invalid RunConfig") as err:
        build_config(RunConfig, _tree(**sweep))
    assert message in str(err.value)


def test_grid_and_random_points():
    config = build_config(RunConfig, _tree(grid={"beta": [0.1, 0.5], "loss_type": ["sigmoid", "ipo"]},
                                           random={"peft.r": {"choice": [4, 8]}}))
    assert config.sweep.grid_points() == [
        {"beta": 0.1, "loss_type": "sigmoid"}, {"beta": 0.1, "loss_type": "ipo"},
        {"beta": 0.5, "loss_type": "sigmoid"}, {"beta": 0.5, "loss_type": "ipo"}]
    assert len(config.sweep.corner_points()) == 8  # each grid point with each choice


def test_cli_refuses_a_run_without_sweep_section_or_held_out_pairs(tmp_path, capsys, hh_path, tiny_llama):
    from helpers import run_config

    path = tmp_path / "run.yaml"
    save_config(run_config(hh_path, tiny_llama, tmp_path, "x", tmp_path / "cache"), path)
    assert main(["sweep", "--config", str(path)]) == 2
    assert "no sweep section" in capsys.readouterr().err
    assert main(["sweep", "--config", str(path), "sweep.grid.beta=[0.1,0.2]"]) == 2
    assert "sweep.metric=eval_loss is a held-out metric" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.slow
def test_sweep_scores_the_reference_once_and_reports_failed_trials(ray_session, hh_path, tiny_llama,
                                                                   tmp_path, capsys):
    """The CLI's sweep over two β values and two batch sizes on the tiny model: one reference pass
    (on the driver, a fresh cache), two trained runs that each read it from the cache, two trials
    whose global batch is larger than the training pairs (they fail in the trial: no silent
    drop), a results table with every trial, and on this machine one trial at a time."""
    from helpers import STEPS, run_config

    config = run_config(hh_path, tiny_llama, tmp_path, None, tmp_path / "cache",
                        **{**STEPS, "max_steps": 2, "eval_steps": 0})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config_dict(config).items() if v is not None}))
    code = main(["sweep", "--config", str(path), "sweep.grid.beta=[0.1,0.5]",
                 "sweep.grid.per_device_train_batch_size=[2,64]", "sweep.name=betas"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "error: 2 of 4 sweep trials failed" in err
    sweep_dir = tmp_path / "runs" / "betas"

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert (summary["trials"], summary["done"], summary["failed"]) == (4, 2, 2)
    assert summary["reference"]["scoring_passes"] == 1
    assert summary["reference"]["scoring_passes_saved"] == 1
    assert "[sweep] reference values computed 1x for 2 trials (1 scoring passes saved)" in out
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1

    table = pd.read_csv(sweep_dir / "results.csv")
    assert table["trial"].tolist() == [f"trial-00{i}" for i in range(4)]
    failed = table[table["status"] == "error"]
    assert failed["per_device_train_batch_size"].tolist() == [64, 64]
    assert failed["error"].str.contains("less than one global batch").all()
    table = table[table["status"] == "done"]
    assert sorted(table["beta"]) == [0.1, 0.5]
    assert table["reference_cache_hit"].all()  # each trial found the driver's pass in the cache
    assert table["step"].tolist() == [2, 2]
    assert table["eval_loss"].notna().all() and table["eval_loss"].nunique() == 2
    for _, row in table.iterrows():  # an ordinary run directory, with the trial's own β
        run_dir = Path(row["run_dir"])
        assert run_dir.parent == sweep_dir and run_dir.name == row["trial"]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["beta"] == row["beta"]
        assert (run_dir / "final_model" / "config.json").exists()
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["eval_loss"] == pytest.approx(row["eval_loss"])
    best = table.loc[table["eval_loss"].idxmin()]
    assert summary["best"]["trial"] == best["trial"]
    assert summary["best"]["values"]["beta"] == best["beta"]

    if ray_session.cluster_resources()["CPU"] < 5:  # 2 workers x 1 CPU + a data task: one at a time
        assert summary["max_concurrent_trials"] == 1
        spans = sorted(((sweep_dir / t / "config.yaml").stat().st_mtime,
                        (sweep_dir / t / "final_model").stat().st_mtime) for t in table["trial"])
        assert spans[0][1] <= spans[1][0], spans  # the second started after the first ended
