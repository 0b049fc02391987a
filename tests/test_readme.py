"""The README's config example and the shipped recipe stay valid, and the recipe is the demo."""

import re
from pathlib import Path

from ctxdistill.config import load_config
from ctxdistill.demo import demo_config

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_is_the_demo():
    recipe = load_config(ROOT / "recipes/country_capital.toml").to_dict()
    demo = demo_config().to_dict()
    for d in (recipe, demo):
        d.pop("out_dir")
        d["data"]["superni"] = Path(d["data"]["superni"]).name
    assert recipe == demo


def test_readme_config_block_loads(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks, "README has a TOML example"
    for i, block in enumerate(blocks):
        (tmp_path / f"c{i}.toml").write_text(block)
        cfg = load_config(tmp_path / f"c{i}.toml")
        assert "{input}" in cfg.task.teacher


def test_every_recipe_loads():
    import tomllib

    from ctxdistill.experiments import is_experiment, load_experiment
    from ctxdistill.fewshot import load_recipe

    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert len(recipes) >= 4
    for r in recipes:
        raw = tomllib.loads(r.read_text())
        if raw.get("experiment", {}).get("kind") == "examples":
            exp = load_recipe(r, raw)
            assert exp.k and exp.n_eval > 0
        elif raw.get("experiment", {}).get("kind") == "scratchpad":
            from ctxdistill.scratchpad import load_recipe as load_scratchpad

            exp = load_scratchpad(r, raw)
            assert exp.n_eval >= 2000 and 1 <= exp.max_digits <= 64
        elif is_experiment(r):
            exp, _, _ = load_experiment(r)
            assert exp.tasks and exp.n_eval > 0
        else:
            load_config(r)
