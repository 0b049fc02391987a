"""Input synthesis: screening rules, diversity, error paths (tiny model) and a real run (slow)."""

import json

import pytest

from ctxdistill.config import SynthConfig, load_config
from ctxdistill.core.errors import UserError
from ctxdistill.inputs import distinct_n, normalise_candidate, prepare_inputs, screen


def test_screen_rules():
    sc = SynthConfig(min_chars=2, max_chars=20)
    seeds, evals = {"france"}, {"japan"}
    assert screen(" Peru\nInput: Chile", True, sc, seeds, evals) == ("Peru", None)
    assert screen("Peru", True, sc, seeds, evals) == ("Peru", None)  # ended with the terminator
    assert screen("Peru and more words", False, sc, seeds, evals)[1].startswith("unfinished")
    assert screen("  France \n", False, sc, seeds, evals)[1] == "equals a seed input"
    assert screen('"JAPAN"\n', False, sc, seeds, evals)[1] == "equals an eval input"
    assert screen("X\n", False, sc, seeds, evals)[1] == "too short"
    assert screen("A very long country name indeed\n", False, sc, seeds, evals)[1] == "too long"
    assert screen("\n", False, sc, seeds, evals)[1] == "empty"
    assert normalise_candidate('  "Saint   Lucia" ') == "Saint Lucia"


def test_distinct_n():
    assert distinct_n(["a b", "a b"], 1) == 0.5 and distinct_n(["a b c"], 2) == 1.0 and distinct_n([], 2) == 0.0


def _synth_task(tiny_task, **over):
    return tiny_task(**{"data.inputs": '"synthesize"', "data.synth.n": "5", "data.synth.n_seeds": "4",
                        "data.synth.max_new_tokens": "2", "data.synth.budget": "8", **over})


def test_too_few_seeds_is_an_error(tiny_task):
    cfg = load_config(_synth_task(tiny_task, **{"data.synth.n_seeds": "1"}))
    with pytest.raises(UserError, match="at least 2 distinct seed inputs"):
        prepare_inputs(cfg)
    assert not (cfg.out / "inputs" / "train.jsonl").exists()


def test_nothing_accepted_is_an_error_naming_the_reasons(tiny_task):
    # A random tiny model never ends a line within 2 tokens: every candidate is rejected as unfinished.
    cfg = load_config(_synth_task(tiny_task))
    with pytest.raises(UserError, match="no input accepted out of 8 generations.*unfinished"):
        prepare_inputs(cfg)


@pytest.mark.slow
def test_synthesis_on_the_embedded_model(tmp_path):
    from ctxdistill.demo import demo_config

    cfg = demo_config(str(tmp_path / "run"))
    cfg.data.inputs = "synthesize"
    cfg.data.synth = SynthConfig(n=500, n_seeds=8, task="country name", budget=64, max_new_tokens=12, max_chars=60)
    stats = prepare_inputs(cfg)
    s = stats["synth"]
    assert s["generated"] == 64 and s["budget_exhausted"] and 0 < s["accepted"] < 500
    rows = [json.loads(line) for line in open(cfg.out / "inputs/train.jsonl")]
    assert len(rows) == s["accepted"] == stats["n_train"]  # what was accepted is still written
    keys = [r["input"].casefold() for r in rows]
    assert len(set(keys)) == len(keys)
    evals = {json.loads(line)["input"].casefold() for line in open(cfg.out / "inputs/eval.jsonl")}
    seeds = {x.casefold() for x in stats["source"]["synth_seed_inputs"]}
    assert not (set(keys) & evals) and not (set(keys) & seeds)
    assert s["accepted"] + s["duplicates"] + sum(s["rejected"].values()) == 64


def test_a_large_synthesis_seed_samples(tiny_model_dir):
    """data.synth.seed reaches torch.manual_seed multiplied by 10^6 twice: a seed of 3 * 10^7 overflowed it."""
    from ctxdistill.core import models
    from ctxdistill.inputs import sample_lines

    tok, model = models.load_tokenizer(str(tiny_model_dir)), models.load_model(str(tiny_model_dir))
    sc = SynthConfig(seed=30_000_000, max_new_tokens=4)
    prompts = [tok("Input: a question\nInput:")["input_ids"]] * 2
    assert len(sample_lines(model, tok, prompts, sc, round_no=3)) == 2
