"""Bad input, tried systematically: every case is its own test. Each asserts exit code 2, one error line
naming the file, line or field, no traceback, and nothing half-written (no new file but the command log).

The CLI runs in-process (`cli.main`), which is what `python -m ctxdistill` calls; test_cli.py runs real
subprocesses for the same guarantees.
"""

import json
from pathlib import Path

import pytest

from conftest import one_line_error
from ctxdistill.core.files import write_jsonl

SPIDER_SCHEMA = 'CREATE TABLE "t" ("a" int, "b" text);\nINSERT INTO t VALUES (1, "x");\n'


@pytest.fixture
def env(tmp_path, tiny_task):
    """A valid task directory (config.toml, train/eval JSONL; conftest's tiny_task) to break one thing in."""
    tiny_task()
    return tmp_path, tiny_task


def _files(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _check(tmp_path, capsys, argv, *needles):
    before = _files(tmp_path)
    one_line_error(capsys, argv, *needles)
    new = {f for f in _files(tmp_path) - before if not f.endswith("commands.txt")}
    if "run/inputs/stats.json" in new:  # the inputs stage finished (atomically) before a later stage refused
        new = {f for f in new if not f.startswith("run/inputs/")}
    assert not new, f"left behind: {sorted(new)}"
    assert not [f for f in _files(tmp_path) if ".tmp-" in f]


# --- config files ---------------------------------------------------------------------------------------

def test_config_missing(env, capsys):
    _check(env[0], capsys, ["teach", env[0] / "nope.toml"], "nope.toml", "not found")


def test_config_empty_file(env, capsys):
    (env[0] / "config.toml").write_text("")
    _check(env[0], capsys, ["teach", env[0] / "config.toml"], "config.toml", "task")


def test_config_invalid_toml(env, capsys):
    (env[0] / "config.toml").write_text("[task\nteacher = 1")
    _check(env[0], capsys, ["teach", env[0] / "config.toml"], "config.toml", "invalid TOML")


def test_config_latin1(env, capsys):
    p = env[1](**{"task.teacher": '"Qu\u00e9 es la capital de {input}?"'})
    p.write_bytes(p.read_text().encode("latin-1"))
    _check(env[0], capsys, ["teach", p], "config.toml", "UTF-8")


def test_config_bom_mid_file(env, capsys):
    p = env[1]()
    text = p.read_bytes()
    p.write_bytes(text.replace(b"[train]", b"\xef\xbb\xbf[train]"))  # a leading BOM is tolerated; elsewhere not
    _check(env[0], capsys, ["teach", p], "config.toml", "invalid TOML")


def test_config_is_a_directory(env, capsys):
    _check(env[0], capsys, ["teach", env[0]], str(env[0]), "not found")


@pytest.mark.parametrize("key, value, needle", [
    ("train.lr", "nan", "train.lr"),
    ("train.lr", "-1e-4", "train.lr"),
    ("train.lr", "inf", "train.lr"),
    ("train.epochs", "0", "train.epochs"),
    ("train.batch_size", "-4", "train.batch_size"),
    ("train.epochs", '"three"', "train.epochs"),
    ("train.loss", '"mse"', "train.loss"),
    ("train.method", '"qlora"', "train.method"),
    ("train.weight_decay", "-0.1", "train.weight_decay"),
    ("generation.temperature", "-1.0", "generation.temperature"),
    ("generation.max_new_tokens", "0", "generation.max_new_tokens"),
    ("generation.samples_per_input", "0", "generation.samples_per_input"),
    ("teach.top_k", "0", "teach.top_k"),
    ("eval.batch_size", "0", "eval.batch_size"),
    ("data.n_eval", "-1", "data.n_eval"),
    ("train.learning_rate", "1e-4", "train.learning_rate"),
    ("task.teacher", None, "task.teacher"),
])
def test_config_bad_field(env, capsys, key, value, needle):
    _check(env[0], capsys, ["teach", env[1](**{key: value})], needle)


def test_out_dir_is_a_file(env, capsys):
    (env[0] / "run").write_text("not a directory")
    _check(env[0], capsys, ["teach", env[1]()], "run", "file")


# --- templates ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, needle", [
    ("task.student", '"just text"', "{input}"),
    ("task.teacher", '"{input} and again {input}"', "{input}"),
    ("task.teacher", '"What is {country}?"', "{country}"),
    ("task.student", '"{input"', "task.student"),
    ("task.teacher_prefill", '"The capital of {input} is {input}"', "{input}"),
])
def test_template_bad(env, capsys, key, value, needle):
    _check(env[0], capsys, ["teach", env[1](**{key: value})], key, needle)


# --- extractors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, needle", [
    ({"task.extractor.pattern": "'(unclosed'"}, "task.extractor.pattern"),
    ({"task.extractor.kind": '"magic"'}, "task.extractor.kind"),
    ({"task.extractor.kind": '"marker"', "task.extractor.pattern": None}, "task.extractor.marker"),
    ({"task.extractor.pattern": "'(a)(b)'", "task.extractor.group": "3"}, "task.extractor.group"),
])
def test_extractor_bad(env, capsys, overrides, needle):
    _check(env[0], capsys, ["teach", env[1](**overrides)], needle)


# --- JSONL inputs ---------------------------------------------------------------------------------------

def _write(env, name, data: bytes):
    (env[0] / name).write_bytes(data)


@pytest.mark.parametrize("name, data, needles", [
    ("train.jsonl", b"", ("train.jsonl", "empty")),
    ("train.jsonl", b"\n\n", ("train.jsonl", "empty")),
    ("train.jsonl", b'{"input": "Peru"}\n{"input": "Chile"\n', ("train.jsonl:2", "invalid JSON")),
    ("train.jsonl", b'{"text": "Peru"}\n', ("train.jsonl:1", "input")),
    ("train.jsonl", b'{"input": 42}\n', ("train.jsonl:1", "input")),
    ("train.jsonl", b'{"input": ""}\n', ("train.jsonl:1", "input")),
    ("train.jsonl", b'["Peru"]\n', ("train.jsonl:1",)),
    ("train.jsonl", b'{"input": "Per\xfa"}\n', ("train.jsonl", "UTF-8")),
    ("train.jsonl", b'{"input": "Peru"}\n\xef\xbb\xbf{"input": "Chile"}\n', ("train.jsonl:2", "invalid JSON")),
    ("train.jsonl", b'{"input": "' + b"Peru " * 400_000 + b'\n', ("train.jsonl:1", "invalid JSON")),
    ("train.jsonl", b'{"id": "a", "input": "Peru"}\n{"id": "a", "input": "Chile"}\n', ("train.jsonl:2", "duplicate id")),
    ("eval.jsonl", b'{"input": "France"}\n', ("eval.jsonl:1", "reference")),
    ("eval.jsonl", b'{"input": "France", "reference": []}\n', ("eval.jsonl:1", "reference")),
])
def test_jsonl_bad(env, capsys, name, data, needles):
    cfg = env[1]()
    _write(env, name, data)
    _check(env[0], capsys, ["teach", cfg], *needles)


def test_jsonl_missing_file(env, capsys):
    cfg = env[1](**{"data.train": '"missing.jsonl"'})
    _check(env[0], capsys, ["teach", cfg], "missing.jsonl")


def test_input_longer_than_the_window(env, capsys):
    cfg = env[1](**{"model.max_length": "64"})
    _write(env, "train.jsonl", json.dumps({"input": "Peru " * 200}).encode() + b"\n")
    _check(env[0], capsys, ["teach", cfg], "tokens")


# --- model paths ----------------------------------------------------------------------------------------

def test_model_path_missing(env, capsys):
    _check(env[0], capsys, ["teach", env[1](**{"model.name": f'"{env[0]}/no-such-model"'})], "model.name", "does not exist")


def test_model_dir_without_config(env, capsys):
    (env[0] / "empty-model").mkdir()
    _check(env[0], capsys, ["teach", env[1](**{"model.name": f'"{env[0]}/empty-model"'})], "model.name", "config.json")


def test_train_init_not_a_directory(env, capsys):
    _check(env[0], capsys, ["train", env[1](**{"train.init": '"nowhere"'})], "train.init")


# --- store directories ----------------------------------------------------------------------------------

def test_train_without_teacher_pass(env, capsys):
    _check(env[0], capsys, ["train", env[1]()], "teacher")


def test_eval_without_student(env, capsys, tiny_model_dir):
    cfg = env[1](**{"eval.systems": '["student"]'})
    _check(env[0], capsys, ["eval", cfg], "student")


# --- SPIDER schemas and recipes -------------------------------------------------------------------------

def _spider(root: Path, schema: str, n: int = 12):
    (root / "database" / "db1").mkdir(parents=True)
    (root / "database" / "db1" / "schema.sql").write_text(schema)
    rows = [{"db_id": "db1", "question": f"q{i}?", "query": f"SELECT a FROM t WHERE a = {i}", "split": "dev"} for i in range(n)]
    write_jsonl(root / "examples.jsonl", rows)


def _spider_recipe(tmp_path, tiny_model_dir):
    p = tmp_path / "recipe.toml"
    p.write_text(f'out_dir = "out"\n[experiment]\nkind = "examples"\ntask = "spider"\nspider = "sp"\nk = [1, 2]\n'
                 f'[model]\nname = "{tiny_model_dir}"\n')
    return p


def test_spider_schema_that_fails(tmp_path, tiny_model_dir, capsys):
    _spider(tmp_path / "sp", SPIDER_SCHEMA + "CREATE TABLE broken (;\n")
    _check(tmp_path, capsys, ["run", _spider_recipe(tmp_path, tiny_model_dir)], "db1", "CREATE TABLE broken")


def test_spider_examples_missing(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "sp" / "database").mkdir(parents=True)
    _check(tmp_path, capsys, ["run", _spider_recipe(tmp_path, tiny_model_dir)], "examples.jsonl")


def test_spider_too_few_queries(tmp_path, tiny_model_dir, capsys):
    _spider(tmp_path / "sp", SPIDER_SCHEMA, n=2)
    _check(tmp_path, capsys, ["run", _spider_recipe(tmp_path, tiny_model_dir)], "db1", "distinct queries")


def test_recipe_with_its_own_task_table(tmp_path, tiny_model_dir, capsys):
    p = tmp_path / "recipe.toml"
    p.write_text(f'[experiment]\nkind = "scratchpad"\n[task]\nteacher = "{{input}}"\n[model]\nname = "{tiny_model_dir}"\n')
    _check(tmp_path, capsys, ["run", p], "[task]")


def test_compose_stage_file_missing(tmp_path, capsys):
    p = tmp_path / "compose.toml"
    p.write_text('[compose]\nstages = [["a.toml"]]\n')
    _check(tmp_path, capsys, ["run", p], "a.toml")


# --- CLI flags ------------------------------------------------------------------------------------------

def test_unknown_flag(env, capsys):
    _check(env[0], capsys, ["teach", env[1](), "--frobnicate"], "--frobnicate")


def test_unknown_command(env, capsys):
    _check(env[0], capsys, ["distil", env[1]()], "distil")


def test_baseline_examples_file_missing(env, capsys):
    _check(env[0], capsys, ["baseline", "sft", env[1](), "--examples", env[0] / "none.jsonl"], "none.jsonl")


def test_baseline_zero_epochs(env, capsys):
    ex = env[0] / "labelled.jsonl"
    write_jsonl(ex, [{"input": "Peru", "reference": ["Lima"]}])
    _check(env[0], capsys, ["baseline", "sft", env[1](), "--examples", ex, "--epochs", "0"], "epochs")


def test_train_sft_rows_without_reference(env, capsys):
    ex = env[0] / "labelled.jsonl"
    write_jsonl(ex, [{"input": "Peru"}])
    _check(env[0], capsys, ["train", env[1](), "--sft", ex], "labelled.jsonl:1", "reference")


def test_leading_bom_is_tolerated(env):
    """Not a bad input: editors on Windows write one; config and JSONL files may start with a BOM."""
    from ctxdistill.config import load_config
    from ctxdistill.inputs import read_rows

    p = env[1]()
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    assert load_config(p).task.student == "{input}"
    (env[0] / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"input": "Peru"}\n')
    assert read_rows(env[0] / "b.jsonl", need_ref=False)[0]["input"] == "Peru"


def test_eval_prompt_over_the_window(env, capsys):
    """Evaluation never truncates either: an eval input too long for the window is refused by name."""
    cfg = env[1](**{"model.max_length": "64", "eval.systems": '["base"]'})
    _write(env, "eval.jsonl", json.dumps({"input": "Peru " * 200, "reference": "Lima"}).encode() + b"\n")
    _check(env[0], capsys, ["eval", cfg], "eval: base", "window")


# --- ctxdistill bake ------------------------------------------------------------------------------------

def _bake(tmp_path, tiny_model_dir, *extra, prompt: bytes | None = b"You are a travel agent. Mention Globetrotter."):
    if prompt is not None:
        (tmp_path / "prompt.txt").write_bytes(prompt)
    return ["bake", "--model", tiny_model_dir, "--out", tmp_path / "bakeout",
            *(["--system-prompt", tmp_path / "prompt.txt"] if prompt is not None else []), *extra]


@pytest.mark.parametrize("prompt, needles", [
    (b"", ["task.teacher_system_file", "prompt.txt", "empty"]),
    (b"  \n\n  ", ["task.teacher_system_file", "empty"]),
    ("Vous \u00eates un agent.".encode("latin-1"), ["task.teacher_system_file", "not UTF-8"]),
    # ~900 tokens: no room in the tiny model's 512-token window
    (("You are a travel agent. " * 180).encode(), ["task.teacher_system", "window of 512"]),
])
def test_bake_prompt_file_bad(tmp_path, tiny_model_dir, capsys, prompt, needles):
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, prompt=prompt), *needles)


def test_bake_prompt_file_missing_or_a_directory(tmp_path, tiny_model_dir, capsys):
    argv = _bake(tmp_path, tiny_model_dir, prompt=None) + ["--system-prompt", tmp_path / "nope.txt"]
    _check(tmp_path, capsys, argv, "task.teacher_system_file", "nope.txt", "not found")
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, prompt=None) + ["--system-prompt", tmp_path],
           "task.teacher_system_file", "not found")


def test_bake_without_any_context(tmp_path, tiny_model_dir, capsys):
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, prompt=None), "give a context", "--system-prompt")


@pytest.mark.parametrize("seeds, needles", [
    ("Where is my order?\n", ["data.synth.seeds", "holds 1 distinct input", "at least 2"]),
    ("Where is my order?\nWhere is my order?\n\n", ["holds 1 distinct input"]),
    ("", ["data.synth.seeds", "empty"]),
])
def test_bake_seed_file_bad(tmp_path, tiny_model_dir, capsys, seeds, needles):
    (tmp_path / "seeds.txt").write_text(seeds)
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, "--seeds", tmp_path / "seeds.txt"), *needles)


@pytest.mark.parametrize("flag, value, needles", [
    ("--check", "(unclosed", ["task.checks[0].regex", "invalid regex"]),
    ("--check-python", "reply.startswith(", ["task.checks[0].python", "not a Python expression"]),
    ("--check-python", "replly.startswith('Hi')", ["task.checks[0].python", "unknown name 'replly'"]),
    ("--set", "train.lr", ["--set", "SECTION.FIELD=VALUE"]),
    ("--set", "train.learning_rate=1e-4", ["train.learning_rate", "unknown field"]),
    ("--set", "train.lr=-1", ["train.lr"]),
    ("--n-eval", "0", ["--n-eval", ">= 1"]),
])
def test_bake_flag_bad(tmp_path, tiny_model_dir, capsys, flag, value, needles):
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, flag, value), *needles)


def test_bake_shots_file_bad(tmp_path, tiny_model_dir, capsys):
    write_jsonl(tmp_path / "shots.jsonl", [{"user": "Hi", "assistant": "Hello!"}, {"user": "Bye"}])
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, "--shots", tmp_path / "shots.jsonl"),
           "shots.jsonl:2", "assistant")


def test_bake_out_that_holds_something_else(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "bakeout").mkdir()
    (tmp_path / "bakeout" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # never deleted, even with --overwrite
        _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, *extra), "bakeout", "not a ctxdistill bake")
    assert (tmp_path / "bakeout" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("facts, needles", [
    ('{"input": "Phone number?", "answer": "555"}\n{"input": "Hours?"\n', ["facts.jsonl:2", "invalid JSON"]),
    ('{"input": "Phone number?"}\n', ["facts.jsonl:1", "missing field 'answer'"]),
    ('{"input": "Phone number?", "answer": ""}\n', ["facts.jsonl:1", "empty string"]),
    ('{"input": "Phone number?", "answer": ["555", " "]}\n', ["facts.jsonl:1", "empty string"]),
    ('{"input": "Phone number?", "answer": []}\n', ["facts.jsonl:1", "non-empty list"]),
    ('{"input": "", "answer": "555"}\n', ["facts.jsonl:1", "'input'"]),
    ('', ["facts.jsonl", "empty"]),
])
def test_bake_facts_file_bad(tmp_path, tiny_model_dir, capsys, facts, needles):
    (tmp_path / "facts.jsonl").write_text(facts)
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, "--facts", tmp_path / "facts.jsonl"), *needles)


@pytest.mark.parametrize("setting, needles", [
    ("teach.samples=0", ["teach.samples", ">= 1"]),
    ("teach.select=[\"checks\", \"luck\"]", ["teach.select", "unknown rule 'luck'"]),
    ("teach.context=\"paragraph\"", ["teach.context", "whole, passage"]),
    ("data.synth.kinds=[\"detail\", \"gossip\"]", ["data.synth.kinds", "unknown kind 'gossip'"]),
    ("data.synth.kinds=[]", ["data.synth.kinds"]),
    ("data.synth.prompt=\"paragraphs\"", ["data.synth.prompt", "passages"]),
    ("data.synth.general_share=1.5", ["data.synth.general_share", "[0, 1)"]),
    ("teach.fact_temperature=-1", ["teach.fact_temperature"]),
])
def test_bake_knowledge_settings_bad(tmp_path, tiny_model_dir, capsys, setting, needles):
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, "--set", setting), *needles)


def test_bake_grounded_check_bad(tmp_path, tiny_model_dir, capsys):
    _check(tmp_path, capsys, _bake(tmp_path, tiny_model_dir, "--set", "task.checks=[{grounded = \"yes\"}]"),
           "task.checks[0].grounded", "must be true")
