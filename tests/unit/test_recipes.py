"""`algorithm=<recipe>` selects each paper's defaults, and every field stays overridable.

The expected values are the papers' (ALGORITHMS.md section 1, 3), written out here
rather than read back from the YAML, so an edit to a recipe that drifts from its paper
fails a test.
"""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from algorithms import AlgorithmConfig
from trainer.cli import CONFIG_DIR
from trainer.config import GroveConfig, register_configs

register_configs()

# Every recipe runs asynchronously by default, so every one carries the same correction.
OFF_POLICY = {"decoupled": True, "prox_mode": "recompute", "tis": "token", "tis_cap": 2.0, "rejection": "none"}
RECIPES = {
    "grpo": {"advantage": "group_norm", "policy_loss": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2,
             "loss_agg": "token-mean", "kl_coef": 0.0, "dynamic_sampling": False, "requires_sampler": None},
    "dr_grpo": {"advantage": "mean_only", "policy_loss": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2,
                "loss_agg": "seq-mean-token-sum-norm", "loss_agg_constant": 8.0,  # = rollout.max_tokens
                "kl_coef": 0.0, "dynamic_sampling": False},
    "dapo": {"advantage": "group_norm", "policy_loss": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28,
             "loss_agg": "token-mean", "kl_coef": 0.0, "dynamic_sampling": True, "max_num_gen_batches": 10},
    "gspo": {"advantage": "group_norm", "policy_loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4,
             "loss_agg": "seq-mean-token-mean", "kl_coef": 0.0, "dynamic_sampling": False},
}


def compose_raw(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def load(overrides: list[str]) -> GroveConfig:
    return OmegaConf.to_object(compose_raw(overrides))


def test_every_shipped_recipe_is_tested():
    assert {p.stem for p in (CONFIG_DIR / "algorithm").glob("*.yaml")} == {*RECIPES, "xrpo"} == set(PAPERS)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_has_the_papers_defaults(name):
    algo = load([f"algorithm={name}"]).algorithm
    assert algo.name == name
    expected = {**RECIPES[name], **OFF_POLICY}
    assert {field: getattr(algo, field) for field in expected} == expected
    assert not algo.novelty_sharpening and algo.requires_sampler is None


PAPERS = {"grpo": "2402.03300", "dr_grpo": "2503.20783", "dapo": "2503.14476", "gspo": "2507.18071",
          "xrpo": "2510.06672"}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_recipe_file_names_its_paper(name):
    text = (CONFIG_DIR / "algorithm" / f"{name}.yaml").read_text()
    assert text.startswith("# @package algorithm\n")
    assert f"arXiv {PAPERS[name]}" in text


def test_grpo_is_the_default():
    assert load([]).algorithm == load(["algorithm=grpo"]).algorithm


def test_dataclass_defaults_are_the_grpo_recipe():
    # AlgorithmConfig is the schema every recipe is merged onto, so its defaults are GRPO's:
    # code that builds AlgorithmConfig() gets what `algorithm=grpo` gets.
    assert AlgorithmConfig() == load(["algorithm=grpo"]).algorithm


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_recipe_file_states_only_what_differs_from_grpo(name):
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "algorithm" / f"{name}.yaml"), resolve=False)
    assert raw.pop("name") == name
    raw.pop("defaults", None)  # a recipe may choose another group's option (xrpo: its sampler)
    fields = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    assert set(raw) <= fields, f"{name}.yaml sets unknown keys {set(raw) - fields}"
    defaults = AlgorithmConfig()
    same = {key: value for key, value in raw.items() if value == getattr(defaults, key)}
    assert not same, f"{name}.yaml restates GRPO's defaults {same}; state only what the recipe changes"
    if name == "grpo":
        assert raw == {}


def test_dr_grpo_constant_follows_the_generation_budget():
    assert load(["algorithm=dr_grpo", "rollout.max_tokens=32"]).algorithm.loss_agg_constant == 32.0
    assert load(["algorithm=dr_grpo", "algorithm.loss_agg_constant=null"]).algorithm.loss_agg_constant is None


@pytest.mark.parametrize("overrides,field,value", [
    (["algorithm=dapo", "algorithm.clip_high=0.3"], "clip_high", 0.3),
    (["algorithm=dapo", "algorithm.dynamic_sampling=false"], "dynamic_sampling", False),
    (["algorithm=gspo", "algorithm.policy_loss=gspo_token"], "policy_loss", "gspo_token"),
    (["algorithm=dr_grpo", "algorithm.loss_agg_constant=1024"], "loss_agg_constant", 1024.0),
    (["algorithm=grpo", "algorithm.loss_agg=seq-mean-token-mean"], "loss_agg", "seq-mean-token-mean"),
    (["algorithm=dapo", "algorithm.prox_mode=loglinear"], "prox_mode", "loglinear"),
])
def test_overrides_on_top_of_a_recipe(overrides, field, value):
    algo = load(overrides).algorithm
    assert getattr(algo, field) == value
    assert algo.name == overrides[0].split("=")[1]  # the rest of the recipe is kept


def test_bad_override_on_a_recipe_names_the_field():
    with pytest.raises(Exception, match="clip_low"):
        load(["algorithm=gspo", "algorithm.clip_low=1.5"])


def test_dapo_overlong_shaping_is_one_more_reward():
    cfg = load(["algorithm=dapo", "reward.functions=[{fn: exact_match}, "
                "{fn: overlong_penalty, kwargs: {max_len: 8, cache_len: 4}}]"])
    assert [f.fn for f in cfg.reward.functions] == ["exact_match", "overlong_penalty"]
    assert cfg.reward.functions[1].kwargs == {"max_len": 8, "cache_len": 4}
    with pytest.raises(Exception, match="overlong_max_len"):  # the old option is gone
        load(["algorithm=dapo", "reward.overlong_max_len=8"])


def test_xrpo_selects_its_sampler_and_refuses_another():
    cfg = load(["algorithm=xrpo", "algorithm.novelty_lambda=0.5", "algorithm.novelty_kappa=0.25"])
    algo = cfg.algorithm
    assert (algo.novelty_sharpening, algo.novelty_lambda, algo.novelty_kappa) == (True, 0.5, 0.25)
    assert algo.requires_sampler == "xrpo" and algo.advantage == "group_norm"
    assert cfg.sampling.name == "xrpo"  # the recipe chose its allocator
    raw = compose_raw(["algorithm=xrpo", "sampling=uniform"])
    with pytest.raises(Exception) as info:
        OmegaConf.to_object(raw)
    message = str(info.value.__cause__ or info.value)
    assert "algorithm=xrpo needs its 'xrpo' prompt sampler" in message and "sampling=xrpo" in message
