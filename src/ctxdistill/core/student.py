"""The student's weights: where they start, when a trained one is up to date, saving it, and loading it back.

Training (train.py, onpolicy.py, baseline.py) starts a student here and saves it here; export and evaluation
load it from here, so no stage has to import the one that trained it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from ctxdistill.config import Config, ModelConfig
from ctxdistill.core import distributed, models
from ctxdistill.core.errors import UserError
from ctxdistill.core.files import normal_file_mode
from ctxdistill.core.progress import log


def init_model_config(cfg: Config) -> ModelConfig:
    """Where the student's weights start: the model itself, or `train.init` (an earlier student)."""
    if not cfg.train.init:
        return cfg.model
    if cfg.train.init == models.EMBEDDED:  # e.g. a fine-tuned teacher, and the student from the original weights
        return dataclasses.replace(cfg.model, name=models.EMBEDDED)
    path = cfg.path(cfg.train.init)
    if not path.is_dir():
        raise UserError(f"train.init: {path} is not a model directory (or 'embedded')")
    return dataclasses.replace(cfg.model, name=str(path))


def setup_model(cfg: Config):
    """The student starts from the teacher's initial weights (or train.init); LoRA wraps it with a peft adapter."""
    model = models.load_model(init_model_config(cfg))
    if cfg.train.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [t for t in cfg.train.lora_targets if any(n.endswith(t) for n, _ in model.named_modules())]
        if not targets:
            raise UserError(f"train.lora_targets: none of {cfg.train.lora_targets} name a module of this model")
        with warnings.catch_warnings():  # peft calls a transformers API that v5 marks deprecated
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=cfg.train.lora_r, lora_alpha=cfg.train.lora_alpha,
                                                     lora_dropout=cfg.train.lora_dropout, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
    model.train()
    return model


def seeded_student(cfg: Config):
    """(tokenizer, student) with the torch seed set first, so LoRA's initialisation repeats."""
    torch.manual_seed(cfg.train.seed)
    return models.load_tokenizer(cfg.model.name), setup_model(cfg)


def up_to_date(cfg: Config, data_hash: str, overwrite: bool) -> dict | None:
    """The summary of an existing student trained on the same data with the same settings (and the same
    mixed precision), else None."""
    out = cfg.out / "student"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path exists and is a file")
    if out.exists() and not overwrite and (out / "ctxdistill_config.json").is_file():
        prev = json.loads((out / "ctxdistill_config.json").read_text())
        if (prev.get("store_hash") == data_hash and train_settings(prev.get("train")) == train_settings(cfg)
                and prev.get("init_fingerprint", "model") == init_fingerprint(cfg)
                and prev.get("mixed_precision", "no") == distributed.mixed_precision()):
            log(f"train: {out} is up to date; reusing it (pass --overwrite to retrain)")
            return prev
    return None


def train_settings(cfg_or_dict) -> dict | None:
    """The [train] settings that shape the result: all but how often checkpoints are written, and how the loss
    is chunked and the batch split into micro-batches (the same loss and gradients up to float rounding)."""
    if cfg_or_dict is None:
        return None
    d = cfg_or_dict if isinstance(cfg_or_dict, dict) else cfg_or_dict.to_dict()["train"]
    return {k: v for k, v in d.items() if k not in ("checkpoint_every", "loss_chunk", "grad_accum")}


def init_fingerprint(cfg: Config) -> str:
    """The starting weights' content hash (every byte: an earlier student may differ only in late tensors)."""
    if not cfg.train.init:
        return "model"
    return models.fingerprint(init_model_config(cfg).name, full=True)


def summarize(cfg: Config, data_hash: str, n_examples: int, history: list[dict], elapsed: float, **extra) -> dict:
    last_epoch = [h for h in history if h["epoch"] == history[-1]["epoch"]]
    return {
        "store_hash": data_hash, "mode": cfg.train.mode, "train": cfg.to_dict()["train"], "config": cfg.to_dict(),
        "n_examples": n_examples, "steps": len(history), "seconds": round(elapsed, 2),
        "answer_tokens_per_s": round(sum(h["tokens"] for h in history) / elapsed, 1),
        # Of the token positions the forward passes ran: padding, and the shared-prefix saving.
        "padding_fraction": round(sum(h["pad_tokens"] for h in history) / sum(h["computed_tokens"] for h in history), 4),
        "computed_per_seq_token": round(sum(h["computed_tokens"] for h in history) / sum(h["seq_tokens"] for h in history), 4),
        "first_loss": history[0]["loss"], "final_loss": sum(h["loss"] for h in last_epoch) / len(last_epoch),
        "adapter": cfg.train.method == "lora", "init_fingerprint": init_fingerprint(cfg),
        "mixed_precision": distributed.mixed_precision(), **extra,
    }


def save_student(model, tok, out, summary: dict, history: list[dict]) -> None:
    """Save a standard HF model (or peft adapter) directory with the config that produced it, atomically
    (the main process of a multi-process run; the others wait until it is there). FSDP-sharded weights
    are gathered first, with every rank taking part."""
    weights = None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):  # tied weights (embeddings = LM head)
            if first.setdefault(id(p), name) != name:  # are saved once, as save_pretrained does on its own
                weights.pop(name, None)
    if not distributed.is_main():
        distributed.barrier("train: student saved")
        return
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        for f in tmp.glob("*.safetensors"):  # safetensors writes them 0600; the rest of the directory is 0644
            os.chmod(f, normal_file_mode())
        tok.save_pretrained(tmp)
        (tmp / "ctxdistill_config.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        if history:  # a training run's step log; an export or a merge has none
            with open(tmp / "train_log.jsonl", "w") as fh:
                fh.writelines(json.dumps(h) + "\n" for h in history)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier("train: student saved")


def load_student(cfg: Config):
    """The trained student for inference: a full model directory, or the base model plus the adapter."""
    out = cfg.out / "student"
    info = out / "ctxdistill_config.json"
    if not info.is_file():
        raise UserError(f"{out}: no trained student here; run `ctxdistill train` first")
    summary = json.loads(info.read_text())
    mf = cfg.out / "teacher" / "manifest.json"
    if summary.get("mode", "offline") == "offline" and mf.is_file() and json.loads(mf.read_text())["hashes"]["all"] != summary.get("store_hash"):
        raise UserError(f"{out}: this student was trained on a different distillation set than {mf.parent}; "
                        "re-run `ctxdistill train --overwrite`")
    if summary.get("adapter"):
        return models.load_model(init_model_config(cfg), adapter=out)
    return models.load_model(dataclasses.replace(cfg.model, name=str(out)))


def merged_from(model_dir) -> str | None:
    """The content hash of the student a standalone model directory was exported from (export.py stamps it in its
    ctxdistill_config.json), or None where there is no such directory."""
    info = model_dir / "ctxdistill_config.json"
    return json.loads(info.read_text()).get("merged_from") if info.is_file() else None
