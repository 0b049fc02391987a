"""Stage 6, export: the student as a standalone Hugging Face model, with a model card.

`<out>/model/` holds full weights (a LoRA adapter folded in with peft's `merge_and_unload`; a fully
fine-tuned student is whole already and is only copied) in the base model's dtype (export.dtype), the
tokenizer with its chat template, the generation config, and README.md in the Hub's model-card format (YAML
metadata, then the text). It loads with `AutoModelForCausalLM.from_pretrained` or
`pipeline("text-generation")` where ctxdistill is not installed. `ctxdistill_config.json` beside it records
what it was exported from. With export.gguf, gguf_export.py adds a GGUF file and an Ollama Modelfile, which
the card lists.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ctxdistill.core import models
from ctxdistill.config import DTYPES, EMBEDDED, Config
from ctxdistill.core.progress import log

MODEL_DIR = "model"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantised from


def full_weights(cfg: Config, dest: Path, copy_whole: bool, dtype: str | None = None) -> Path:
    """A directory of full weights for the student in `<cfg.out>/student/`, saved in `dest` once per student
    (reused while the student and `dtype` are unchanged). A LoRA student has its adapter merged into its base.
    A fully fine-tuned student is whole: with `copy_whole` it is saved to `dest` too, else its own directory
    is returned (nothing to merge either way). `dtype`: save the weights in it (None: as trained)."""
    from ctxdistill.core.student import save_student
    from ctxdistill.core.student import load_student

    student = cfg.out / "student"
    summary = json.loads((student / "ctxdistill_config.json").read_text())
    if not summary.get("adapter") and not copy_whole:
        return student
    stamp = stamp_of(cfg, dtype)
    if saved_stamp(dest, stamp) is True:
        return dest
    model = load_student(cfg)
    if summary.get("adapter"):
        model = model.merge_and_unload()  # in the training dtype; rounded to `dtype` once, after the sum
        log(f"merged the LoRA adapter into full weights: {dest}")
    else:
        log(f"the student was fully fine-tuned: no adapter to merge (a no-op); saved it whole to {dest}")
    if dtype is not None:
        import torch

        model = model.to(getattr(torch, dtype))
        model.config.dtype = dtype
    save_student(model, models.load_tokenizer(cfg.model.name), dest,
                 {**stamp, "adapter": False, "base_model": cfg.model.name, "student": summary}, [])
    return dest


def stamp_of(cfg: Config, dtype: str | None = None) -> dict:
    """What a merged directory was made from: the student's bytes, and the dtype it was saved in."""
    stamp = {"merged_from": models.fingerprint(str(cfg.out / "student"), full=True)}
    return {**stamp, "dtype": dtype} if dtype is not None else stamp


def saved_stamp(dest: Path, stamp: dict) -> bool | None:
    """Whether the merged directory `dest` was made as `stamp` says (None: there is none)."""
    info = dest / "ctxdistill_config.json"
    if not info.is_file():
        return None
    have = json.loads(info.read_text())
    return all(have.get(k) == v for k, v in stamp.items())


def export_dtype(cfg: Config) -> str:
    """export.dtype, with "auto" read as the base model's own dtype: its config's `dtype` (`torch_dtype` before
    transformers 5), float32 when it states none. The embedded model is bfloat16: the dtype its source,
    HuggingFaceTB/SmolLM2-135M-Instruct, is published in (the GGUF we ship is a Q4_1 quantisation of it, and
    our cached conversion of that GGUF says float32 only because it was dequantised to float32)."""
    if cfg.export.dtype != "auto":
        return cfg.export.dtype
    if cfg.model.name == EMBEDDED:
        return "bfloat16"
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(models.resolve(cfg.model.name))
    except (OSError, ValueError):
        return "float32"
    dt = getattr(mc, "dtype", None) or getattr(mc, "torch_dtype", None)
    dt = str(dt).removeprefix("torch.") if dt is not None else "float32"
    return dt if dt in DTYPES else "float32"


def export_model(cfg: Config) -> Path:
    """`<out>/model/`: the deployable student (see the module docstring), in `export_dtype(cfg)`."""
    return full_weights(cfg, cfg.out / MODEL_DIR, copy_whole=True, dtype=export_dtype(cfg))


def reexport(config: Path, dtype: str | None = None, overwrite: bool = False) -> tuple[Path, str]:
    """`ctxdistill export OUT --format hf`: write OUT/model/ again from the bake's student (a LoRA adapter merged)
    in `dtype` (export.dtype when None), and its model card; `config` is the bake's OUT/config.toml. An export in
    another dtype, or of another student, is replaced only with `overwrite`. Returns the model directory and its
    dtype."""
    from ctxdistill.config import load_config
    from ctxdistill.core.errors import UserError

    config = Path(config)
    if not config.is_file():
        raise UserError(f"{config.parent}: no {config.name} here (a bake writes one); for a run from a config file, "
                        "set [export] merge = true (and dtype) in it and run it again")
    cfg = load_config(config)
    if not (cfg.out / "student" / "ctxdistill_config.json").is_file():
        raise UserError(f"{cfg.out / 'student'}: no trained student to export; run the bake first")
    cfg.export.merge = True
    if dtype:
        cfg.export.dtype = dtype
    dest, dtype = cfg.out / MODEL_DIR, export_dtype(cfg)
    if saved_stamp(dest, stamp_of(cfg, dtype)) is False and not overwrite:
        have = json.loads((dest / "ctxdistill_config.json").read_text()).get("dtype")
        raise UserError(f"{dest}: holds an export in {have or 'another dtype'} (or of another student); "
                        "pass --overwrite to replace it (its GGUF files and Modelfile go with it)")
    export_model(cfg)
    rep = cfg.out / "eval" / "report.json"
    if rep.is_file():
        write_card(cfg, json.loads(rep.read_text()))
    return dest, dtype


def export_gguf(cfg: Config, overwrite: bool = True) -> dict | None:
    """With export.gguf: `<out>/model/<out name>-<TYPE>.gguf` and its Modelfile (gguf_export.py), rewritten only
    when missing or made from other weights. Needs `export_model` first."""
    from ctxdistill import gguf_export

    if not cfg.export.gguf:
        return None
    dest = cfg.out / MODEL_DIR
    name = gguf_export.default_name(cfg.out)
    if gguf_export.up_to_date(dest, name, cfg.export.gguf):
        return None
    return gguf_export.export_gguf(cfg.out, cfg.export.gguf, overwrite=overwrite, name=name)


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
        *gguf_card_lines(dest),
        "## How it was made", "",
        "```", *(commands or [f"ctxdistill run {cfg.out / 'config.toml'}"]), "```", "",
        *([f"The same run as a config file: `{cfg.out / 'config.toml'}` (`ctxdistill run` repeats it)."]
          if (cfg.out / "config.toml").is_file() else []), "",
    ])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    write_atomic(dest / "README.md", str(card))
    return dest / "README.md"


GGUF_HEADING = "## Run it with llama.cpp or Ollama"


def gguf_card_lines(dest: Path) -> list[str]:
    """The card's GGUF section: each GGUF in `dest` with its sha256, and the Ollama and llama.cpp commands;
    without one, the command that writes it."""
    import re

    from ctxdistill import gguf_export

    files = [(n, e) for n, e in gguf_export.read_index(dest).items() if (dest / n).is_file()]
    if not files:
        return [GGUF_HEADING, "", f"`ctxdistill export {dest.parent} --format gguf` writes a GGUF file for llama.cpp, "
                "Ollama and LM Studio, and an Ollama Modelfile, into this directory.", ""]
    modelfile = dest / gguf_export.MODELFILE
    m = re.search(r"^FROM \./(.+)$", modelfile.read_text(), re.M) if modelfile.is_file() else None
    used = m.group(1) if m else files[-1][0]
    name = dict(files).get(used, files[-1][1]).get("ollama_name", "baked")
    return [GGUF_HEADING, "", "Without a system prompt: the context is in the weights.", "",
            "| file | type | size | sha256 |", "|---|---|---|---|",
            *[f"| `{n}` | {e['quant']} | {e['bytes'] / 1e6:.1f} MB | `{e['sha256']}` |" for n, e in files], "",
            "```bash", f"cd {dest}",
            f"ollama create {name} -f Modelfile && ollama run {name}   # Modelfile: FROM ./{used}",
            f"llama-cli -m {used} -cnv        # llama.cpp: chat in the terminal (the chat template is in the file)",
            f"llama-server -m {used} --port 8080   # llama.cpp: an OpenAI-compatible server",
            "```", ""]


def refresh_card(dest: Path) -> Path | None:
    """Rewrite the GGUF section of `dest/README.md` in place (after `ctxdistill export --format gguf`), or add it
    before "How it was made"; None when there is no card of ours (a Hugging Face model directory's own README.md
    is left alone)."""
    from ctxdistill.core.files import write_atomic

    card = dest / "README.md"
    if not card.is_file() or not (dest / "ctxdistill_config.json").is_file():
        return None
    text = card.read_text(encoding="utf-8")
    section = "\n".join(gguf_card_lines(dest)) + "\n"
    start = text.find("\n" + GGUF_HEADING + "\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + section + (text[end + 1:] if end >= 0 else "")
    else:
        at = text.find("\n## How it was made")
        text = text[:at + 1] + section + text[at + 1:] if at >= 0 else text.rstrip("\n") + "\n\n" + section
    write_atomic(card, text)
    return card
