"""`bake`: from a model and a context (a system prompt and/or few-shot turns) to the same model without it.

No labelled data is needed. The pipeline runs with these choices (every one can be overridden):
  inputs   synthesised: with seed inputs, the paper's few-shot prompt; without, self-study (selfstudy.py): the
           context is split into passages and half the inputs are questions about each passage's facts and
           requests to restate it, the other half messages the model behind the context writes as a user
           would. data.n_eval of them are held out, never trained on (or, with an eval file, the held-out
           inputs are that file's); the questions of a facts file are never trained on.
  teach    the model with the context answers each input; the whole reply is the answer (a reply cut at
           max_new_tokens is kept, without a terminator). A question about one fact is answered greedily by
           the model given that fact's passage (with the opening one and those that instruct the assistant);
           the rest are sampled at temperature 1 (the paper's setting) with the whole context, the best of 4 by
           the rule checks and grounding kept.
  train    LoRA on the teacher's soft labels, from the bare input.
  export   the adapter merged into a standalone Hugging Face model in <out>/model/, with a model card.
  eval     reference-free fidelity (fidelity.py) and the rule checks, on the held-out inputs.

The equivalent config is written to <out>/config.toml, so `ctxdistill run <out>/config.toml` repeats (or
resumes) the run. An <out> that holds another bake is refused unless `overwrite`.

    from ctxdistill import bake
    report = bake(model="embedded", system_prompt=Path("prompt.txt"), out="runs/my_bake")
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ctxdistill.config import Config, config_from_dict, load_config, template_literal, to_toml
from ctxdistill.core.errors import UserError

CONFIG_NAME = "config.toml"  # in <out>: the bake as a config file; also what marks <out> as a bake
SEEDS_NAME = "seeds.txt"     # in <out>: seed inputs given as a list (the Python API)

# What a bake runs with, before the user's arguments and overrides (the TOML tables of a config).
DEFAULTS = {
    "task": {"name": "bake", "teacher": "{input}", "student": "{input}", "scorer": "none",
             "extractor": {"kind": "whole", "keep_unfinished": True}},
    "data": {"inputs": "synthesize", "n_eval": 48,
             "synth": {"n": 512, "max_new_tokens": 48, "max_chars": 400, "batch_size": 32,
                       # self-study without seeds (selfstudy.py): half the inputs are questions and restatement
                       # requests about each passage of the context, half general messages (docs/results.md, issue 25)
                       "kinds": ["detail", "paraphrase", "restate", "recite", "general"], "general_share": 0.5}},
    "generation": {"temperature": 1.0, "max_new_tokens": 64},
    # A question about one fact is answered greedily by the teacher given that fact's passage (with the opening one
    # and the instructions: the prompt's rules for the voice); the rest are sampled with the whole context, the
    # best of 4 by the rule checks and grounding kept.
    "teach": {"batch_size": 32, "samples": 4, "context": "passage"},
    "train": {"method": "lora", "lr": 1e-3, "epochs": 2, "batch_size": 8},
    "eval": {"max_new_tokens": 64, "batch_size": 16},
    "export": {"merge": True},
}


def parse_override(item: str) -> tuple[str, object]:
    """'section.field=value' -> (key, value); the value is read as a TOML literal (1e-4, true, "text",
    [1, 2]), and as a plain string when it is not one."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or key.startswith(".") or key.endswith("."):
        raise UserError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. --set train.lr=1e-4")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def set_field(raw: dict, key: str, value) -> None:
    """Set a dotted config field (`train.lr`, as `--set` names it) in a raw config dict, making its sections."""
    *path, name = key.split(".")
    d = raw
    for p in path:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {key}: {p} is a field, not a section")
        d = nxt
    d[name] = value


def read_shots(path: Path) -> list[list[str]]:
    """Few-shot turns from JSONL: {"user": ..., "assistant": ...} per line."""
    from ctxdistill.core.files import read_jsonl_numbered

    shots = []
    for n, row in read_jsonl_numbered(path, ("user", "assistant")):
        if not all(isinstance(row[k], str) and row[k].strip() for k in ("user", "assistant")):
            raise UserError(f"{path}:{n}: 'user' and 'assistant' must be non-empty strings")
        shots.append([row["user"], row["assistant"]])
    return shots


def bake_config(model: str = "embedded", system_prompt: str | os.PathLike | None = None, *,
                shots: list | os.PathLike | None = None, seeds: list[str] | os.PathLike | None = None,
                checks: list[dict] | None = None, eval_inputs: os.PathLike | None = None,
                facts: os.PathLike | None = None, out: str | os.PathLike = "runs/bake", merge: bool = True,
                overrides: dict | None = None) -> Config:
    """The config a bake runs: DEFAULTS, then the arguments, then `overrides` ({"train.lr": 1e-4, ...}).

    `system_prompt`: the text, or a path (os.PathLike) of a UTF-8 file holding it; literal text either way.
    `shots`: [user, assistant] pairs, or a JSONL path. `seeds`: inputs, or a file (one per line, or JSONL);
    given as a list, they are kept in <out>/seeds.txt. `eval_inputs`: a file of held-out inputs (one per line,
    or JSONL), evaluated instead of data.n_eval synthesised ones. `facts`: closed-book fact questions (JSONL
    {"input", "answer"}; data.facts), scored as fact recall and never trained on. Paths are absolute in the
    result."""
    raw = copy.deepcopy(DEFAULTS)
    out = Path(out).expanduser().resolve()
    raw["out_dir"] = str(out)
    raw["model"] = {"name": model if model == "embedded" or not Path(model).expanduser().exists()
                    else str(Path(model).expanduser().resolve())}
    if isinstance(system_prompt, os.PathLike):
        raw["task"]["teacher_system_file"] = str(Path(system_prompt).expanduser().resolve())
    elif system_prompt is not None:
        if not system_prompt.strip():
            raise UserError("system_prompt: is empty")
        raw["task"]["teacher_system"] = template_literal(system_prompt.strip())
    if shots is not None:
        raw["task"]["teacher_shots"] = (read_shots(Path(shots)) if isinstance(shots, os.PathLike)
                                        else [list(s) for s in shots])
    if system_prompt is None and not raw["task"].get("teacher_shots"):
        raise UserError("bake: give a context to bake in: a system prompt (--system-prompt FILE) and/or few-shot "
                        "turns (--shots FILE)")
    if seeds is None:
        raw["data"]["synth"]["prompt"] = "passages"
    else:
        raw["data"]["synth"]["prompt"] = "seeds"
        raw["data"]["synth"]["seeds"] = str(Path(seeds).expanduser().resolve()) if isinstance(seeds, os.PathLike) \
            else str(out / SEEDS_NAME)
    if checks:
        raw["task"]["checks"] = [dict(c) for c in checks]
    if eval_inputs is not None:
        raw["data"]["eval"] = str(Path(eval_inputs).expanduser().resolve())
        del raw["data"]["n_eval"]  # the file's inputs are the held-out ones
    if facts is not None:
        raw["data"]["facts"] = str(Path(facts).expanduser().resolve())
    raw["export"]["merge"] = merge
    for key, value in (overrides or {}).items():
        set_field(raw, key, value)
    return config_from_dict(raw, base_dir=Path.cwd())


def preflight(cfg: Config, seeds: list[str] | None = None) -> None:
    """Every check that needs no model weights, before anything is written: the model exists, the device and
    dtype suit this machine, the seeds are enough, and the context leaves room in the window."""
    from ctxdistill.core import models
    from ctxdistill.inputs import check_room, read_eval, read_facts, read_seeds

    models.placement(cfg.model)
    models.resolve(cfg.model.name)
    if cfg.export.gguf:  # an architecture the GGUF export refuses is refused now, not after training
        from ctxdistill.gguf_export import check_model

        check_model(cfg.model.name)
    if cfg.data.synth.prompt == "seeds":
        if seeds is not None:
            if len({s.strip() for s in seeds if s.strip()}) < 2:
                raise UserError(f"seeds: {len(seeds)} given; give at least 2 distinct seed inputs")
        else:
            read_seeds(cfg.path(cfg.data.synth.seeds))
    if cfg.data.eval:
        read_eval(cfg)
    if cfg.data.facts:
        read_facts(cfg.path(cfg.data.facts))
    check_room(cfg, models.load_tokenizer(cfg.model.name), models.window_of(cfg.model))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def claim_out(cfg: Config, overwrite: bool, seeds: list[str] | None = None) -> None:
    """Make <out> this bake's: refuse one that holds another bake (a different config, or different seeds)
    unless `overwrite` (which starts it afresh), and one that holds anything else whatever `overwrite`
    says; then write <out>/config.toml (and <out>/seeds.txt for seeds given as a list)."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is a file")
    marker = out / CONFIG_NAME
    seeds_text = "".join(s.strip() + "\n" for s in seeds if s.strip()) if seeds is not None else None
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise UserError(f"{out}: exists and is not a ctxdistill bake (no {CONFIG_NAME}); choose another --out "
                            "(nothing there was changed)")
        try:
            old = _flat(load_config(marker).to_dict())
        except UserError:
            old = {"(unreadable config)": True}
        new = _flat(cfg.to_dict())
        # export.* shapes only <out>/model/ (its dtype, a GGUF), which the export stage redoes when it differs,
        # so adding --gguf to a finished bake reuses every other stage instead of asking for --overwrite.
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith("export."))
        seeds_file = out / SEEDS_NAME
        if seeds_text is not None and seeds_file.is_file() and seeds_file.read_text(encoding="utf-8") != seeds_text:
            diff.append("seeds")
        if overwrite:
            shutil.rmtree(out)
        elif diff:
            shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise UserError(f"{out}: holds another bake (different {shown}); pass --overwrite to replace it, or "
                            "choose another --out")
    from ctxdistill.core.files import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    if seeds_text is not None:
        write_atomic(out / SEEDS_NAME, seeds_text)
    write_atomic(marker, "# ctxdistill bake: `ctxdistill run` of this file repeats (or resumes) the run.\n"
                 + to_toml(cfg))


def bake(model: str = "embedded", system_prompt: str | os.PathLike | None = None, *,
         shots: list | os.PathLike | None = None, seeds: list[str] | os.PathLike | None = None,
         checks: list[dict] | None = None, eval_inputs: os.PathLike | None = None,
         facts: os.PathLike | None = None, out: str | os.PathLike = "runs/bake", merge: bool = True,
         overrides: dict | None = None, overwrite: bool = False) -> dict:
    """Bake a context into a model (see the module docstring and `bake_config`); return the evaluation report."""
    from ctxdistill.pipeline import run

    cfg = bake_config(model, system_prompt, shots=shots, seeds=seeds, checks=checks, eval_inputs=eval_inputs,
                      facts=facts, out=out, merge=merge, overrides=overrides)
    seed_list = None if seeds is None or isinstance(seeds, os.PathLike) else list(seeds)
    preflight(cfg, seed_list)
    claim_out(cfg, overwrite, seed_list)
    return run(cfg)
