"""Stage 6, export: the student as a standalone Hugging Face model, with a model card.

`<out>/model/` holds full weights (a LoRA adapter folded in with peft's `merge_and_unload`; a fully
fine-tuned student is whole already and is only copied), the tokenizer with its chat template, the
generation config, and README.md in the Hub's model-card format (YAML metadata, then the text). It loads
with `AutoModelForCausalLM.from_pretrained` or `pipeline("text-generation")` where ctxdistill is not
installed. `ctxdistill_config.json` beside it records what it was exported from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ctxdistill.core import models
from ctxdistill.config import EMBEDDED, Config
from ctxdistill.core.progress import log

MODEL_DIR = "model"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantised from


def full_weights(cfg: Config, dest: Path, copy_whole: bool) -> Path:
    """A directory of full weights for the student in `<cfg.out>/student/`, saved in `dest` once per student
    (reused while the student is unchanged). A LoRA student has its adapter merged into its base. A fully
    fine-tuned student is whole: with `copy_whole` it is saved to `dest` too, else its own directory is
    returned (nothing to merge either way)."""
    from ctxdistill.core.loop import save_student
    from ctxdistill.train import load_student

    student = cfg.out / "student"
    summary = json.loads((student / "ctxdistill_config.json").read_text())
    if not summary.get("adapter") and not copy_whole:
        return student
    stamp = {"merged_from": models.fingerprint(str(student), full=True)}
    info = dest / "ctxdistill_config.json"
    if info.is_file() and json.loads(info.read_text()).get("merged_from") == stamp["merged_from"]:
        return dest
    model = load_student(cfg)
    if summary.get("adapter"):
        model = model.merge_and_unload()
        log(f"merged the LoRA adapter into full weights: {dest}")
    else:
        log(f"the student was fully fine-tuned: no adapter to merge (a no-op); saved it whole to {dest}")
    save_student(model, models.load_tokenizer(cfg.model.name), dest,
                 {**stamp, "adapter": False, "student": summary}, [])
    return dest


def export_model(cfg: Config) -> Path:
    """`<out>/model/`: the deployable student (see the module docstring)."""
    return full_weights(cfg, cfg.out / MODEL_DIR, copy_whole=True)


def context_summary(cfg: Config, tok) -> dict:
    """What the card says of the context: its sha256, the prompt tokens it adds to a request (teacher prompt
    minus student prompt, for an empty input), its system prompt's length in characters, its shot count."""
    from ctxdistill.core.templates import student_template, teacher_template

    t = teacher_template(cfg.task)
    text = json.dumps({"system": t.system, "shots": t.shots, "user": t.user, "prefill": t.prefill})
    added = len(t.render(tok, "")[0]) - len(student_template(cfg.task).render(tok, "")[0])
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "system_chars": len(t.system),
            "tokens": added, "shots": len(t.shots)}


def base_model_id(name: str) -> str | None:
    """The Hub id of the base model for the card's metadata, when it has one."""
    if name == EMBEDDED:
        return EMBEDDED_HUB_ID
    return None if Path(name).expanduser().exists() else name


def write_card(cfg: Config, rep: dict) -> Path:
    """README.md in `<out>/model/`: the Hub's model-card format, from the evaluation report."""
    from huggingface_hub import ModelCard, ModelCardData

    from ctxdistill import report
    from ctxdistill.core.files import write_atomic

    dest = cfg.out / MODEL_DIR
    tok = models.load_tokenizer(cfg.model.name)
    ctx = context_summary(cfg, tok)
    base_id = base_model_id(cfg.model.name)
    data = ModelCardData(base_model=base_id, library_name="transformers", pipeline_tag="text-generation",
                         tags=["ctxdistill", "context-distillation", "prompt-baking"])
    head, rows = report.table_rows(rep)
    counts = []
    if rep.get("inputs"):
        i = rep["inputs"]
        syn = i.get("synth")
        counts.append(f"- Inputs: {i['n_train']} for training, {i['n_eval']} held out for evaluation"
                      + (f" (synthesised: {syn.get('rule_built', 0)} built from the context's sentences, "
                         f"{syn['accepted'] - syn.get('rule_built', 0)} accepted of {syn['generated']} model generations, "
                         f"{syn['duplicates']} duplicates, rejected {syn['rejected'] or 0}, {syn.get('unused', 0)} not "
                         "needed)" if syn else "") + ".")
    if rep.get("teach"):
        t = rep["teach"]
        counts.append(f"- Teacher pass: {t['n_examples']} training examples from {t['n_inputs']} inputs; "
                      f"dropped {t['dropped'] or 0}.")
    tc = cfg.train
    commands = rep.get("commands") or []
    body = "\n".join([
        f"# {cfg.task.name}: {base_id or cfg.model.name} with its context baked in", "",
        f"This model is **{base_id or cfg.model.name}** fine-tuned by context distillation "
        "(ctxdistill; Snell, Klein & Zhong, *Learning by Distilling Context*, 2022) to "
        "behave as the base model does **with** the context below, while being given **no** context. Use it "
        "without the system prompt: the prompt is in the weights.", "",
        "## The context", "",
        f"- sha256: `{ctx['sha256']}`",
        f"- {ctx['tokens']} prompt tokens per request ({ctx['system_chars']} characters of system prompt"
        + (f", {ctx['shots']} few-shot turns" if ctx["shots"] else "") + ")", "",
        "## Data", "", *counts, "",
        "## Evaluation (held-out inputs, greedy decoding)", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows], "",
        *report.summary_lines(rep), "",
        "## Training", "",
        f"- {tc.method} ({'rank ' + str(tc.lora_r) + ', merged into the weights' if tc.method == 'lora' else 'all weights'}), "
        f"loss {tc.loss}, lr {tc.lr}, {tc.epochs} epoch(s), batch {tc.batch_size}; teacher sampling temperature "
        f"{cfg.generation.temperature}, up to {cfg.generation.max_new_tokens} new tokens.", "",
        "## Use", "",
        "```python",
        "from transformers import pipeline",
        f"chat = pipeline(\"text-generation\", model=\"{dest}\")  # this directory",
        "print(chat([{\"role\": \"user\", \"content\": \"...\"}], max_new_tokens=64)[0][\"generated_text\"][-1][\"content\"])",
        "```", "",
        "## How it was made", "",
        "```", *(commands or [f"ctxdistill run {cfg.out / 'config.toml'}"]), "```", "",
        *([f"The same run as a config file: `{cfg.out / 'config.toml'}` (`ctxdistill run` repeats it)."]
          if (cfg.out / "config.toml").is_file() else []), "",
    ])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    write_atomic(dest / "README.md", str(card))
    return dest / "README.md"
