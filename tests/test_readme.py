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

    from ctxdistill.experiments import is_experiment
    from ctxdistill.experiments.instructions import load_experiment
    from ctxdistill.experiments.examples import load_recipe

    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert len(recipes) >= 4
    for r in recipes:
        raw = tomllib.loads(r.read_text())
        if raw.get("experiment", {}).get("kind") == "examples":
            exp = load_recipe(r, raw)
            assert exp.k and exp.n_eval > 0
        elif raw.get("experiment", {}).get("kind") == "scratchpad":
            from ctxdistill.experiments.scratchpad import load_recipe as load_scratchpad

            exp = load_scratchpad(r, raw)
            assert exp.n_eval >= 2000 and 1 <= exp.max_digits <= 64
        elif is_experiment(r):
            exp, _, _ = load_experiment(r)
            assert exp.tasks and exp.n_eval > 0
        else:
            load_config(r)


def test_bake_recipe_is_the_readme_bake_command():
    """recipes/bake_system_prompt.toml is the README's `ctxdistill bake` command: the same config but for
    out_dir and the checks' names (the recipe names them; on the command line each is named by its regex)."""
    import shlex

    from ctxdistill.baking import bake_config, parse_override

    text = (ROOT / "README.md").read_text()
    cmd = re.search(r"^ctxdistill bake (.*?)(?<!\\)$", text.replace("\\\n", " "), re.M).group(1)
    argv = shlex.split(cmd)
    flags: dict[str, list] = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        flags.setdefault(flag, []).append(value)
    assert set(flags) <= {"--system-prompt", "--eval", "--facts", "--check", "--out", "--set"}
    cfg = bake_config("embedded", ROOT / flags["--system-prompt"][0], eval_inputs=ROOT / flags["--eval"][0],
                      facts=ROOT / flags["--facts"][0] if "--facts" in flags else None,
                      checks=[{"name": r, "regex": r} for r in flags["--check"]], out=ROOT / flags["--out"][0],
                      overrides=dict(parse_override(x) for x in flags.get("--set", [])))
    recipe = load_config(ROOT / "recipes/bake_system_prompt.toml")
    a, b = cfg.to_dict(), recipe.to_dict()
    assert [c["regex"] for c in a["task"].pop("checks")] == [c["regex"] for c in b["task"].pop("checks")]
    assert Path(a.pop("out_dir")).resolve() == (ROOT / "runs/bake_system_prompt").resolve() == recipe.out.resolve()
    b.pop("out_dir")
    for d in (a, b):
        d["task"]["teacher_system_file"] = Path(d["task"]["teacher_system_file"]).name
        d["data"]["eval"] = Path(d["data"]["eval"]).name
        d["data"]["facts"] = Path(d["data"]["facts"]).name if d["data"]["facts"] else ""
    assert a == b


def test_second_bake_recipe_holds_the_bake_defaults():
    """recipes/bake_wrenfield.toml is `ctxdistill bake` with its prompt, eval and facts files and its checks: the
    bake defaults spelt out, as the Brambleworth recipe's are."""
    from ctxdistill.baking import bake_config

    recipe = load_config(ROOT / "recipes/bake_wrenfield.toml")
    cfg = bake_config("embedded", recipe.path(recipe.task.teacher_system_file),
                      eval_inputs=recipe.path(recipe.data.eval), facts=recipe.path(recipe.data.facts),
                      checks=recipe.task.checks, out=recipe.out)
    a, b = cfg.to_dict(), recipe.to_dict()
    for d in (a, b):
        for section, key in (("task", "teacher_system_file"), ("data", "eval"), ("data", "facts")):
            d[section][key] = Path(d[section][key]).name
        d["out_dir"] = Path(d["out_dir"]).name
    assert a == b
    assert (ROOT / "recipes/prompts/wrenfield_facts.jsonl").is_file() and b["data"]["facts"]
