"""The whole pipeline on the tiny random Llama: inputs -> teach -> train -> eval, plus store checks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import country_rows
from ctxdistill.config import load_config
from ctxdistill.inputs import prepare_inputs
from ctxdistill.core.errors import UserError
from ctxdistill.pipeline import run
from ctxdistill.store import read_store
from ctxdistill.answers import align_answer
from ctxdistill.teach import teach
from ctxdistill.core.templates import encode
from ctxdistill.train import train


def test_full_pipeline_changes_student_and_writes_report(tiny_task, tiny_model_dir):
    cfg = load_config(tiny_task())
    rep = run(cfg)
    out = cfg.out
    # Artefacts of every stage.
    for f in ("inputs/train.jsonl", "inputs/eval.jsonl", "teacher/manifest.json", "student/config.json",
              "student/model.safetensors", "student/ctxdistill_config.json", "eval/report.json", "eval/report.md",
              "eval/report.png", "eval/predictions.jsonl"):
        assert (out / f).is_file(), f
    # The report has all three rows with scores in [0, 1], and the drop accounting adds up.
    saved = json.loads((out / "eval/report.json").read_text())
    assert saved == rep
    # The wall time of each stage, which add up to the total.
    seconds = json.loads((out / "stage_seconds.json").read_text())
    assert list(seconds) == ["inputs", "teach", "train", "eval", "total"]
    assert all(v >= 0 for v in seconds.values()) and seconds["train"] > 0
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"), abs=0.2)
    assert set(rep["scores"]) == {"base", "teacher", "student"}
    assert all(0.0 <= v <= 1.0 for v in rep["scores"].values())
    assert rep["n_eval"] == 6 and rep["metric"] == "exact" and rep["task"] == "tiny"
    manifest, examples = read_store(out / "teacher")
    assert manifest["n_samples"] == 24  # 12 inputs x 2 samples
    assert manifest["n_examples"] + sum(manifest["dropped"].values()) == 24
    assert manifest["n_examples"] == len(examples) > 0
    assert 0 < manifest["teacher_mean_answer_prob"] <= 1
    # Every student parameter changed (full fine-tuning).
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / "student/model.safetensors"))
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


def test_store_soft_labels_match_the_teacher(tiny_task, tiny_model_dir):
    """The stored top-k are the teacher's own log-probs at the answer positions, and the answer ids
    appear verbatim at the end of the teacher sequence."""
    from ctxdistill.core.models import load_model, load_tokenizer
    from ctxdistill.core.templates import teacher_template

    cfg = load_config(tiny_task(**{"generation.samples_per_input": "1", "generation.temperature": "0.0"}))
    prepare_inputs(cfg)
    teach(cfg)
    _, examples = read_store(cfg.out / "teacher")
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    ex = examples[0]
    chat = teacher_template(cfg.task).chat_ids(tok, ex.meta["input"])
    completion = ex.meta["completion"]
    prefix, answer, ids = align_answer(tok, completion[:completion.rindex(ex.meta["answer"])], ex.meta["answer"])
    assert ids == ex.answer_ids
    seq = chat + encode(tok, prefix) + ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
    a = len(ids)
    expect = logp[len(seq) - a - 1:len(seq) - 1].topk(cfg.teach.top_k, -1)
    assert torch.equal(expect.indices.to(torch.int32), ex.topk_ids)
    assert torch.allclose(expect.values, ex.topk_logprobs, atol=1e-4)
    # The student's prompt is the student template only: the context is gone.
    assert "capital" not in tok.decode(ex.prompt_ids)


def test_align_answer_moves_space_into_answer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prefix, answer, ids = align_answer(tok, "The capital city of France is ", "Paris")
    assert (prefix, answer) == ("The capital city of France is", " Paris")
    assert encode(tok, prefix + answer) == encode(tok, prefix) + ids
    assert encode(tok, answer) == ids


def test_teach_reuses_identical_store_and_refuses_stale(tiny_task):
    cfg = load_config(tiny_task())
    prepare_inputs(cfg)
    m1 = teach(cfg)
    mtime = (cfg.out / "teacher/manifest.json").stat().st_mtime_ns
    assert teach(cfg) == m1 and (cfg.out / "teacher/manifest.json").stat().st_mtime_ns == mtime
    changed = load_config(tiny_task(**{"task.teacher": '"Capital of {input}?"'}))
    prepare_inputs(changed)
    with pytest.raises(UserError, match="teacher_template"):
        teach(changed)
    with pytest.raises(UserError, match="teacher_template"):
        train(changed)
    train(cfg)
    m2 = teach(changed, overwrite=True)
    assert m2["hashes"]["all"] != m1["hashes"]["all"]
    from ctxdistill.core.student import load_student
    with pytest.raises(UserError, match="different distillation set"):
        load_student(changed)
    assert not list(cfg.out.glob("teacher.tmp-*"))


def test_lora_student_is_a_peft_adapter(tiny_task, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(tiny_task(**{"train.method": '"lora"', "train.lora_r": "4", "train.loss": '"jsd"'}))
    prepare_inputs(cfg)
    teach(cfg)
    summary = train(cfg)
    assert summary["adapter"] and (cfg.out / "student/adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, cfg.out / "student")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; training moved it


def test_long_prompt_is_an_error_unless_truncation_asked(tiny_task, tokenizer_dir):
    from transformers import AutoTokenizer

    from ctxdistill.core.templates import teacher_template

    cfg = load_config(tiny_task())
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tpl = teacher_template(cfg.task)
    empty = len(tpl.render(tok, "")[0])
    longest = max(len(tpl.render(tok, r["input"])[0]) for r in country_rows()[0])
    window = longest - 1 + cfg.generation.max_new_tokens  # one token short for the longest input
    assert window - cfg.generation.max_new_tokens > empty
    cfg = load_config(tiny_task(**{"model.max_length": str(window)}))
    with pytest.raises(UserError, match=rf"is {longest} tokens; .* needs {longest + cfg.generation.max_new_tokens}, "
                                        rf"over the model window of {window} tokens"):
        prepare_inputs(cfg)
        teach(cfg)
    assert not (cfg.out / "teacher").exists()
    cfg = load_config(tiny_task(**{"model.max_length": str(window), "teach.truncate": "true"}))
    prepare_inputs(cfg)
    m = teach(cfg)
    assert m["n_truncated"] >= 1


def test_base_and_student_are_scored_on_the_text_after_the_student_prefill(tiny_task):
    """Both run the student template, prefill included in their completions: both lose the prefill before scoring
    (the base model kept it, so a prefill of "Answer:" cost it every exact match the student got)."""
    from ctxdistill.config import load_config
    from ctxdistill.evaluate import replies

    cfg = load_config(tiny_task(**{"task.student_prefill": '"Answer:"'}))
    rows = [{"input": "France"}, {"input": "Peru"}]
    texts = ["Answer: Paris", "Answer: Lima "]
    assert replies(cfg, "base", texts, rows) == replies(cfg, "student", texts, rows) == ["Paris", "Lima"]
