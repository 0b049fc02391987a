"""`ctxdistill bake`: a prompt and no labels in, a standalone model and fidelity scores out (tiny chat model).

Covers the fidelity metrics against a hand computation, the merged model reloaded by plain transformers in a
fresh process, the bake CLI end to end, its config file, `compare`, and references beside fidelity.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ctxdistill.cli import main
from ctxdistill.config import load_config
from ctxdistill.core.errors import UserError

PROMPT = ("You are the travel agent of Globetrotter Tours. Always mention Globetrotter Tours by name.\n"
          "Our phone number is 555-0199. We are open from 9am to 5pm.\n"
          "Example reply format: {\"answer\": ...}\n")  # literal braces in a prompt file need no escaping
# small counts and lengths; the best of 2 teacher samples (the default draws 4) keeps selection in the run
SMALL = ["--n-inputs", "16", "--n-eval", "6", "--set", "generation.max_new_tokens=12", "--set",
         "eval.max_new_tokens=12", "--set", "data.synth.max_new_tokens=16", "--set", "teach.samples=2"]


def bake_cli(*args, capsys=None) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, (capsys.readouterr().out if capsys else "")


@pytest.fixture(scope="module")
def baked(tmp_path_factory, tiny_chat_model_dir):
    """One bake through the CLI: no seeds (the model writes the inputs), LoRA merged, a regex and a Python check."""
    d = tmp_path_factory.mktemp("bake")
    (d / "prompt.txt").write_text(PROMPT)
    argv = ["bake", "--model", tiny_chat_model_dir, "--system-prompt", d / "prompt.txt", "--out", d / "out",
            "--check", "capital", "--check-python", "reply.endswith('.')", *SMALL]
    assert main([str(a) for a in argv]) == 0
    return d, d / "out", argv


def test_bake_end_to_end_writes_everything_a_user_needs(baked):
    d, out, _ = baked
    for f in ("config.toml", "commands.txt", "inputs/train.jsonl", "inputs/eval.jsonl", "teacher/manifest.json",
              "student/adapter_config.json", "model/config.json", "model/model.safetensors", "model/README.md",
              "model/tokenizer.json", "eval/report.json", "eval/report.md", "eval/report.png", "eval/predictions.jsonl"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "eval/report.json").read_text())
    # No references: no reference metric, every reference-free score.
    assert rep["scores"] == {} and rep["metric"] == "none"
    assert set(rep["checks"]) == {"capital", "reply.endswith('.')"}
    assert all(set(v) == {"base", "teacher", "student"} for v in rep["checks"].values())
    fid = rep["fidelity"]
    assert fid["n_inputs"] == 6 and fid["n_answers"] + sum(fid["dropped"].values()) == 6
    assert fid["answer_tokens"] > 0 and fid["kl"]["base"] > 0 and fid["kl"]["student"] >= 0
    assert fid["kl_gap_closed"] == pytest.approx(1 - fid["kl"]["student"] / fid["kl"]["base"], abs=2e-3)
    for s in ("base", "student"):
        assert 0 <= fid["agreement"][s]["exact"] <= 1 and 0 <= fid["agreement"][s]["rouge_l"] <= 1
    cost = fid["cost"]
    assert cost["prompt_tokens"]["teacher"] > cost["prompt_tokens"]["student"]  # the context is gone
    assert cost["latency_ms"]["teacher"] > 0 and cost["latency_ms"]["student"] > 0
    # The split: 6 held out, never trained on; the inputs were written by the model (no seeds).
    train = [json.loads(x)["input"] for x in open(out / "inputs/train.jsonl")]
    evals = [json.loads(x) for x in open(out / "inputs/eval.jsonl")]
    assert len(evals) == 6 and "reference" not in evals[0] and not set(train) & {e["input"] for e in evals}
    assert rep["inputs"]["synth"]["prompt"] == "passages" and rep["inputs"]["n_train"] == len(train) == 16
    # The prompt file's text, braces and all, is the teacher's system prompt.
    cfg = load_config(out / "config.toml")
    assert cfg.task.teacher_system.format(input="") == PROMPT.strip()
    manifest = json.loads((out / "teacher/manifest.json").read_text())
    assert manifest["config"]["task"]["teacher_system"].format(input="") == PROMPT.strip()
    # Every held-out row carries its check results.
    rows = [json.loads(x) for x in open(out / "eval/predictions.jsonl")]
    assert len(rows) == 6 and set(rows[0]["student"]["checks"]) == set(rep["checks"])
    md = (out / "eval/report.md").read_text()
    assert "KL gap closed" in md and "check 1" in md and "check 1: capital" in md and "No references" in md


def test_model_card_in_the_hubs_format(baked):
    from huggingface_hub import ModelCard

    _, out, argv = baked
    card = ModelCard.load(out / "model/README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "context-distillation" in card.data.tags
    rep = json.loads((out / "eval/report.json").read_text())
    text = card.text
    import hashlib

    cfg = load_config(out / "config.toml")
    from ctxdistill.export import context_summary
    from ctxdistill.core.models import load_tokenizer

    ctx = context_summary(cfg, load_tokenizer(cfg.model.name))
    assert ctx["sha256"] in text and f"{ctx['tokens']} prompt tokens" in text and ctx["tokens"] > 20
    assert len(ctx["sha256"]) == len(hashlib.sha256().hexdigest())
    assert f"{rep['inputs']['n_train']} for training, {rep['inputs']['n_eval']} held out" in text
    assert f"{rep['fidelity']['kl_gap_closed']:.2f}" in text and "check 1: capital" in text
    assert rep["commands"][0] in text and rep["commands"][0].startswith("ctxdistill bake --model")


def test_merged_model_reloads_with_plain_transformers_and_reproduces_the_report(baked):
    """A fresh process that never imports ctxdistill loads <out>/model with from_pretrained and with
    pipeline("text-generation"), and its greedy replies equal the student's in the report."""
    _, out, _ = baked
    rows = [json.loads(x) for x in open(out / "eval/predictions.jsonl")]
    script = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
d, inputs, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
out = []
for x in inputs:
    ids = tok.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    gen = model.generate(**ids, max_new_tokens=n, do_sample=False)
    out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
chat = pipeline("text-generation", model=d)
piped = chat([{"role": "user", "content": inputs[0]}], max_new_tokens=n, do_sample=False)[0]["generated_text"][-1]["content"]
assert not any(m.startswith("ctxdistill") for m in sys.modules), "ctxdistill was imported"
print(json.dumps({"generate": out, "pipeline": piped.strip()}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script, str(out / "model"), json.dumps([r["input"] for r in rows]), "12"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=out)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["generate"] == [r["student"]["prediction"] for r in rows]
    assert got["pipeline"] == rows[0]["student"]["prediction"]


def test_run_of_the_written_config_gives_the_same_result(baked, capsys):
    _, out, _ = baked
    before = json.loads((out / "eval/report.json").read_text())
    assert main(["run", str(out / "config.toml")]) == 0
    after = json.loads((out / "eval/report.json").read_text())
    for k in ("scores", "checks", "inputs", "teach"):
        assert after[k] == before[k], k
    assert after["fidelity"]["kl"] == before["fidelity"]["kl"]
    assert "base and student without the context" in capsys.readouterr().out


def test_evaluation_scores_the_exported_model_and_eval_exports_it_first(baked, tmp_path, capsys):
    """With export.merge, evaluate() scores <out>/model/ and refuses one not exported from the student there
    (evaluation imports no export code); `ctxdistill eval` exports first, scores it, and rewrites its card."""
    import shutil

    from ctxdistill.evaluate import evaluate

    _, out, _ = baked
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "config.toml").write_text((out / "config.toml").read_text().replace(str(out), str(copy)))
    cfg = load_config(copy / "config.toml")
    assert cfg.out == copy and cfg.export.merge
    shutil.rmtree(copy / "model")
    with pytest.raises(UserError, match=r"model: not exported from the student .* run `ctxdistill export` first"):
        evaluate(cfg)
    assert main(["eval", str(copy / "config.toml")]) == 0
    capsys.readouterr()
    assert (copy / "model" / "model.safetensors").is_file() and (copy / "model" / "README.md").is_file()
    rep = json.loads((copy / "eval" / "report.json").read_text())
    assert rep["checks"] == json.loads((out / "eval" / "report.json").read_text())["checks"]


def test_a_stage_called_before_its_inputs_names_the_command(tiny_task):
    """From Python a stage never runs the one before it: teach() with no inputs is one error naming the command."""
    from ctxdistill.teach import teach

    cfg = load_config(tiny_task())
    with pytest.raises(UserError, match=r"inputs/train.jsonl: no inputs here yet; run `ctxdistill inputs CONFIG` first"):
        teach(cfg)
    assert not (cfg.out / "teacher").exists()


def test_compare_prints_the_three_systems_side_by_side(baked, capsys):
    d, out, _ = baked
    (d / "msgs.txt").write_text("Tell me about Peru.\n\nWhat is the capital city of Chile?\n")
    assert main(["compare", str(out), "Tell me about Chad.", "--file", str(d / "msgs.txt")]) == 0
    text = capsys.readouterr().out
    for needle in ("base, no context", "teacher, with context", "student, no context", "Tell me about Chad.",
                   "What is the capital city of Chile?"):
        assert needle in text
    assert text.count("input: ") == 3
    from ctxdistill.evaluate import compare

    rows = compare(load_config(out / "config.toml"), ["Tell me about Chad."])
    preds = {json.loads(x)["input"]: json.loads(x) for x in open(out / "eval/predictions.jsonl")}
    x = next(iter(preds))
    again = compare(load_config(out / "config.toml"), [x])[0]
    assert again["student"] == preds[x]["student"]["prediction"] and again["teacher"] == preds[x]["teacher"]["prediction"]
    assert set(rows[0]) == {"input", "base", "teacher", "student"}


def test_config_flag_writes_the_equivalent_run(tmp_path, tiny_chat_model_dir, capsys):
    """`bake --config F` writes F and nothing else; `run F` then gives what the Python API's bake gives."""
    from ctxdistill import bake

    (tmp_path / "prompt.txt").write_text(PROMPT)
    (tmp_path / "seeds.txt").write_text("Tell me about Peru.\nTell me about Chad.\nWhat is the capital city of Fiji?\n")
    args = ["bake", "--model", tiny_chat_model_dir, "--system-prompt", tmp_path / "prompt.txt", "--seeds",
            tmp_path / "seeds.txt", "--out", tmp_path / "a", "--config", tmp_path / "bake.toml", *SMALL]
    assert main([str(a) for a in args]) == 0
    assert "ctxdistill run" in capsys.readouterr().out
    assert (tmp_path / "bake.toml").is_file() and not (tmp_path / "a").exists()
    assert main(["run", str(tmp_path / "bake.toml")]) == 0
    from_file = json.loads((tmp_path / "a/eval/report.json").read_text())
    api = bake(model=str(tiny_chat_model_dir), system_prompt=PROMPT, seeds=["Tell me about Peru.", "Tell me about Chad.",
               "What is the capital city of Fiji?"], out=tmp_path / "b",
               overrides={"data.synth.n": 16, "data.n_eval": 6, "generation.max_new_tokens": 12,
                          "eval.max_new_tokens": 12, "data.synth.max_new_tokens": 16, "teach.samples": 2})
    assert from_file["inputs"]["synth"]["prompt"] == "seeds"
    for k in ("checks", "inputs", "teach", "prompt_tokens_mean"):
        assert api[k] == from_file[k], k
    assert api["fidelity"]["kl"] == from_file["fidelity"]["kl"]
    assert (tmp_path / "b/seeds.txt").read_text().splitlines()[0] == "Tell me about Peru."


def test_merge_with_full_fine_tuning_is_a_no_op(tmp_path, tiny_chat_model_dir):
    (tmp_path / "prompt.txt").write_text(PROMPT)
    argv = ["bake", "--model", tiny_chat_model_dir, "--system-prompt", tmp_path / "prompt.txt", "--out",
            tmp_path / "out", "--merge", "--set", 'train.method="full"', "--set", "train.lr=1e-4", *SMALL]
    assert main([str(a) for a in argv]) == 0
    out = tmp_path / "out"
    assert not (out / "student/adapter_config.json").exists()  # a full model already
    from safetensors.torch import load_file

    a, b = load_file(str(out / "student/model.safetensors")), load_file(str(out / "model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # copied, not changed
    assert (out / "model/README.md").is_file()


def test_another_bake_in_the_same_out_is_refused_unless_overwrite(baked, capsys):
    d, out, argv = baked
    (d / "other.txt").write_text("You are a pirate. Say Ahoy.")
    other = [str(a) for a in argv]
    other[other.index(str(d / "prompt.txt"))] = str(d / "other.txt")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "holds another bake (different task.teacher_system" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_user_config_with_references_gets_fidelity_and_reference_metrics(tiny_task):
    from ctxdistill.pipeline import run

    cfg = load_config(tiny_task(**{"generation.samples_per_input": "1", "task.checks": "[{name = 'any', regex = '.'}]"}))
    rep = run(cfg)
    assert set(rep["scores"]) == {"base", "teacher", "student"} and rep["metric"] == "exact"
    assert rep["fidelity"]["kl"]["base"] > 0 and "kl_gap_closed" in rep["fidelity"]
    assert set(rep["checks"]["any"]) == {"base", "teacher", "student"}


def test_token_kl_by_hand():
    """Two positions over a 3-token vocabulary, against sum_v p log(p / q) written out."""
    from ctxdistill.fidelity import token_kl

    p_logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    q_logits = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, -2.0]])
    expect = []
    for pl, ql in zip(p_logits.tolist(), q_logits.tolist()):
        zp, zq = sum(math.exp(x) for x in pl), sum(math.exp(x) for x in ql)
        p, q = [math.exp(x) / zp for x in pl], [math.exp(x) / zq for x in ql]
        expect.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    assert token_kl(p_logits, q_logits).tolist() == pytest.approx(expect, abs=1e-6)
    assert token_kl(p_logits, p_logits).abs().max() < 1e-6  # zero for identical distributions
    assert (token_kl(p_logits, q_logits) > 0).all()


def test_teacher_forced_kl_equals_a_hand_computation_on_the_tiny_model(tiny_task, tiny_model_dir, tmp_path):
    """Two-token answers: the KL the fidelity stage reports equals one computed from plain full forward passes
    of [teacher prompt, answer] and [student prompt, answer], position by position, in float64."""
    from ctxdistill import fidelity
    from ctxdistill.core.models import load_model, load_tokenizer, tiny_random_llama, window
    from ctxdistill.core.sampling import prefix_for
    from ctxdistill.answers import sample_answers
    from ctxdistill.prompts import fit_prompts

    cfg = load_config(tiny_task(**{"generation.max_new_tokens": "2", "generation.samples_per_input": "1",
                                   "task.teacher_prefill": None, "task.extractor.kind": '"whole"',
                                   "task.extractor.keep_unfinished": "true", "task.extractor.pattern": None,
                                   "task.teacher_system": '"You are a geography teacher. Answer in one word."'}))
    tok, base = load_tokenizer(cfg.model.name), load_model(cfg.model)
    student = load_model(str(tiny_random_llama(tmp_path / "other", max_position_embeddings=512, seed=1)))
    rows = [{"id": "a", "input": "France"}, {"id": "b", "input": "Japan"}]
    res = fidelity.teacher_forced_kl(cfg, tok, base, student, rows)
    assert res["n_answers"] == 2 and res["answer_tokens"] == 4  # 2 answers x 2 tokens
    win = window(base, cfg.model)
    t_prompts, s_prompts = zip(*[fit_prompts(cfg, tok, dict(r), win)[:2] for r in rows])
    kept, _ = sample_answers(base, tok, cfg, [dict(r, teacher_input=r["input"], student_input=r["input"]) for r in rows],
                             list(t_prompts), list(s_prompts), win=win, prefix=prefix_for(base, list(t_prompts)),
                             seed=cfg.teach.seed)  # the same answers; what is computed by hand is their KL
    total = {"base": 0.0, "student": 0.0}
    with torch.no_grad():
        for a in kept:
            assert len(a.answer_ids) == 2 and a.seq[-2:] == a.answer_ids
            t = torch.log_softmax(base(torch.tensor([a.seq])).logits[0, -3:-1].double(), -1)
            s_seq = s_prompts[a.row] + a.answer_ids
            for name, m in (("base", base), ("student", student)):
                q = torch.log_softmax(m(torch.tensor([s_seq])).logits[0, -3:-1].double(), -1)
                total[name] += float((t.exp() * (t - q)).sum())
    for name in total:
        assert res["kl"][name] == pytest.approx(total[name] / 4, abs=1e-4)
    assert res["kl_gap_closed"] == pytest.approx(1 - total["student"] / total["base"], abs=1e-3)
