"""Recipes are data: every shipped recipe and ds_config loads; bad keys name themselves."""

import json
from pathlib import Path

import pytest

from mtmoe.config import load_config
from mtmoe.parallel.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "launch" / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_derives_a_ds_config(recipe):
    cfg = load_config(recipe)
    ds = build_ds_config(cfg, world_size=2)
    t = cfg.train
    assert ds["train_batch_size"] == t.micro_batch_size * t.grad_accum * 2
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_is_usable_with_its_stage(path):
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    cfg = load_config(None, [f"parallel.zero_stage={stage}", f"parallel.ds_config={path}"])
    assert build_ds_config(cfg, 1)["zero_optimization"]["stage"] == stage


def test_there_are_recipes_and_ds_configs():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "tiny.yaml"}
    assert {p.name for p in DS_CONFIGS} >= {"zero0.json", "zero1.json", "zero2.json"}


def test_overrides_are_typed():
    cfg = load_config(RECIPES[0], ["train.steps=7", "moe.layers=[0, 2]", "train.lr=1", "log.run_name=x"])
    assert (
        cfg.train.steps == 7
        and cfg.moe.layers == [0, 2]
        and cfg.train.lr == 1.0
        and isinstance(cfg.train.lr, float)
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.stepz=3", "train.stepz"),
        ("modle.base=x", "modle"),
        ("train.steps=many", "train.steps"),
        ("train.steps=true", "train.steps"),
        ("moe.top_k=9", "moe.top_k"),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        ("data.mixing=random", "data.mixing"),
        ("moe.layers=some", "moe.layers"),
        ("parallel.ep_size=3", "parallel.ep_size"),  # does not divide moe.num_experts=4
        ("parallel.ep_size=0", "parallel.ep_size"),
        ("moe.capacity_factor=-1", "moe.capacity_factor"),
        ("train.max_bad_steps=0", "train.max_bad_steps"),
        ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
        ("balance.qr_ema=1.5", "balance.qr_ema"),
        ("balance.quality_retain=maybe", "balance.quality_retain"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_a_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n  micro_batchsize: 2\n")
    with pytest.raises(ValueError, match=r"r\.yaml.*train\.micro_batchsize"):
        load_config(recipe)


def test_ds_config_refuses_a_second_source_of_batch_size(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    cfg = load_config(None, [f"parallel.ds_config={path}"])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        build_ds_config(cfg, 1)


def test_ds_config_stage_must_agree_with_the_recipe():
    cfg = load_config(None, ["parallel.zero_stage=1", "parallel.ds_config=ds_configs/zero2.json"])
    with pytest.raises(ValueError, match="parallel.zero_stage"):
        build_ds_config(cfg, 1)


@pytest.mark.parametrize(
    "zero",
    [{"zero_quantized_nontrainable_weights": True}, {"offload_param": {"device": "nvme"}}],
    ids=["quantized", "nvme"],
)
def test_a_zero3_json_that_cannot_work_is_refused_naming_its_key(tmp_path, zero):
    path = tmp_path / "z3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, **zero}}))
    cfg = load_config(None, ["parallel.zero_stage=3", f"parallel.ds_config={path}"])
    with pytest.raises(ValueError, match=f"zero_optimization.{next(iter(zero))} cannot be used"):
        build_ds_config(cfg, 2)


def test_a_zero3_json_offloading_to_cpu_is_taken(tmp_path):
    path = tmp_path / "z3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    cfg = load_config(None, ["parallel.zero_stage=3", f"parallel.ds_config={path}"])
    assert build_ds_config(cfg, 2)["zero_optimization"]["offload_param"] == {"device": "cpu"}
