"""Stage 1, inputs: load or synthesise the raw task inputs, split into train and eval.

Writes `<out>/inputs/train.jsonl` ({"id", "input"}) and `<out>/inputs/eval.jsonl` ({"id", "input",
"reference": [...]}) plus `stats.json`. Every later stage reads these files, so a run is reproducible
from its own directory.

Synthesis follows the paper's code (App. B): the same model is prompted with "generate diverse and
high quality inputs for the {task} task" followed by 3 seed inputs in a random order, samples one
candidate per generation, and candidates are normalised, deduplicated and filtered. No labels needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

from ctxdistill.config import Config
from ctxdistill.core.errors import UserError
from ctxdistill.core.files import read_jsonl, read_jsonl_numbered, write_atomic, write_jsonl


def prepare_inputs(cfg: Config) -> dict:
    """Load or split the task's inputs into `<out>/inputs/`; return the stats.

    With no data files (`data.prompt_only`: a prompt and nothing else), data.synth.n + data.n_eval inputs
    are synthesised and data.n_eval of them, drawn at random (data.seed), are held out for evaluation."""
    d = cfg.data
    if d.prompt_only:
        train, evals = [], []
        source = {"prompt_only": True, "n_eval": d.n_eval, "seed": d.seed}
    elif d.superni:
        from ctxdistill.tasks import superni

        task = superni.load(cfg.path(d.superni))
        train, evals = superni.split(task, d.n_eval, d.n_train, d.seed)
        source = {"superni": str(cfg.path(d.superni)), "n_eval": d.n_eval, "n_train": d.n_train, "seed": d.seed}
    else:
        train = read_rows(cfg.path(d.train), need_ref=False) if d.train else []
        evals = read_eval(cfg)
        source = {"train": str(cfg.path(d.train)) if d.train else None, "eval": str(cfg.path(d.eval))}
    out = cfg.out / "inputs"
    if d.inputs == "synthesize":
        seed_rows = read_seeds(cfg.path(d.synth.seeds)) if d.synth.seeds else train[:d.synth.n_seeds]
        source["synth"] = dataclasses.asdict(d.synth)
        source["synth_seed_inputs"] = [r["input"] for r in seed_rows]
        source["eval_inputs_sha"] = hashlib.sha256(json.dumps([r["input"] for r in evals]).encode()).hexdigest()[:16]
        if d.synth.prompt == "context":  # the candidates are asked for behind the teacher's context
            source["context_sha"] = hashlib.sha256(json.dumps(context_messages(cfg)).encode()).hexdigest()[:16]
            source["model"] = cfg.model.name
        old = out / "stats.json"
        if old.is_file() and (out / "train.jsonl").is_file() and json.loads(old.read_text()).get("source") == source:
            return json.loads(old.read_text())  # the same synthesis already ran: reuse it
        n_eval = d.n_eval if d.prompt_only else 0
        train, synth_stats = synthesize(cfg, [r["input"] for r in seed_rows], [r["input"] for r in evals],
                                        n=d.synth.n + n_eval)
        if d.prompt_only:
            train, evals = hold_out(train, n_eval, d.seed, cfg.data.synth)
    overlap = {r["input"] for r in train} & {r["input"] for r in evals}
    stats = {"source": source, "n_train": len(train), "n_eval": len(evals), "train_eval_overlap": len(overlap)}
    if d.inputs == "synthesize":
        stats["synth"] = synth_stats
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    write_atomic(out / "stats.json", json.dumps(stats, indent=2))
    return stats


def load_split(cfg: Config, split: str) -> list[dict]:
    """Rows of one split, preparing the inputs stage first if it has not run."""
    f = cfg.out / "inputs" / f"{split}.jsonl"
    if not f.is_file():
        prepare_inputs(cfg)
    return read_jsonl(f, ("id", "input"))


def read_eval(cfg: Config) -> list[dict]:
    """The eval file's rows: JSONL with references (unless task.scorer = 'none'), or with scorer 'none' a text
    file of inputs, one per line."""
    path = cfg.path(cfg.data.eval)
    if path.suffix != ".txt":
        return read_rows(path, need_ref=cfg.task.scorer != "none",
                         hint=", or task.scorer = \"none\" to evaluate without references")
    if cfg.task.scorer != "none":
        raise UserError(f"data.eval: {path} is a text file, so it has no references; give JSONL with 'reference', "
                        "or set task.scorer = \"none\"")
    return read_lines(path, "data.eval")


def read_lines(path: Path, what: str) -> list[dict]:
    """Inputs from a text file, one per line (blank lines skipped), as rows {"id": "<stem>-<line>", "input"}."""
    from ctxdistill.config import read_text_file

    lines = read_text_file(path, what).splitlines()
    return [{"id": f"{path.stem}-{n}", "input": line.strip()} for n, line in enumerate(lines, 1) if line.strip()]


def hold_out(rows: list[dict], n_eval: int, seed: int, sc) -> tuple[list[dict], list[dict]]:
    """(train, eval): n_eval rows drawn at random (seed) are held out, the rest kept in order."""
    if len(rows) <= n_eval:
        raise UserError(f"data.n_eval: only {len(rows)} inputs were synthesised, not more than the {n_eval} to hold "
                        f"out for evaluation; raise data.synth.budget (now {sc.budget or 4 * (sc.n + n_eval)} "
                        "generations) or lower data.n_eval")
    picked = set(random.Random(seed).sample(range(len(rows)), n_eval))
    return ([r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked])


def read_seeds(path: Path) -> list[dict]:
    """Seed inputs from a JSONL file ({"input": ...} per line) or, for any other suffix, a text file with one
    input per line (blank lines skipped). Fewer than 2 distinct inputs is an error: a few-shot prompt needs them."""
    rows = read_rows(path, need_ref=False) if path.suffix == ".jsonl" else read_lines(path, "data.synth.seeds")
    distinct = len({r["input"] for r in rows})
    if distinct < 2:
        raise UserError(f"data.synth.seeds: {path} holds {distinct} distinct input(s); give at least 2, one per line")
    return rows


def read_rows(path: Path, need_ref: bool, hint: str = "") -> list[dict]:
    """Rows {"id", "input"} (+ "reference": [str, ...] with need_ref) of a JSONL file, checked line by line;
    `hint` ends the message of a missing reference."""
    return _normalise(read_jsonl_numbered(path, ("input",)), path, need_ref, hint)


def _normalise(rows: list[tuple[int, dict]], path: Path, need_ref: bool, hint: str = "") -> list[dict]:
    out = []
    for n, r in rows:
        if not isinstance(r["input"], str) or not r["input"].strip():
            raise UserError(f"{path}:{n}: 'input' must be a non-empty string")
        row = {"id": str(r.get("id", f"{path.stem}-{n}")), "input": r["input"]}
        if need_ref:
            ref = r.get("reference", r.get("references", r.get("output")))
            if ref is None:
                raise UserError(f"{path}:{n}: eval inputs need a 'reference' (a string or a list of strings){hint}")
            refs = ref if isinstance(ref, list) else [ref]
            if not refs or not all(isinstance(x, str) for x in refs):
                raise UserError(f"{path}:{n}: 'reference' must be a string or a non-empty list of strings")
            row["reference"] = refs
        out.append(row)
    seen: dict[str, int] = {}
    for (n, _), r in zip(rows, out):
        if r["id"] in seen:
            raise UserError(f"{path}:{n}: duplicate id {r['id']!r} (first on line {seen[r['id']]})")
        seen[r["id"]] = n
    return out


# -- synthesis -------------------------------------------------------------------------------------

_LABEL = re.compile(r"^(?:input|customer|user|question|message)\s*:\s*", re.I)


def normalise_candidate(text: str) -> str:
    """One line, single spaces, no surrounding quotes, list markers or a leading speaker label ("Customer: ")."""
    line = " ".join(text.split())
    line = line.strip(" \"'`").removeprefix("- ").strip()
    return _LABEL.sub("", line).strip(" \"'`")


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams in `texts` (Li et al. 2016); 0 for no n-grams."""
    grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def screen(text: str, finished: bool, sc, seen_seed: set[str], seen_eval: set[str]) -> tuple[str, str | None]:
    """One generation -> (normalised candidate, rejection reason or None). Keys are case-folded."""
    if "\n" not in text and not finished:
        return "", "unfinished (cut at max_new_tokens)"
    cand = normalise_candidate(text.split("\n", 1)[0])
    key = cand.casefold()
    if not cand:
        return cand, "empty"
    if sc.accept and not re.search(sc.accept, cand):
        return cand, "does not match data.synth.accept"
    if len(cand) < sc.min_chars:
        return cand, "too short"
    if len(cand) > sc.max_chars:
        return cand, "too long"
    if key in seen_seed:
        return cand, "equals a seed input"
    if key in seen_eval:
        return cand, "equals an eval input"
    return cand, None


SEEDS_INSTRUCTION = "Generate diverse and high quality inputs for the {task} task."
CONTEXT_INSTRUCTION = ("Write one message that a user might send you. Reply with that message only, exactly as the "
                       "user would write it.")


def context_messages(cfg: Config) -> list[dict]:
    """prompt = 'context': the teacher's context (system prompt, few-shot turns) and the request for one user
    message, as chat messages; the model's reply is a candidate input."""
    from ctxdistill.core.templates import teacher_template

    t = teacher_template(cfg.task)
    msgs = [{"role": "system", "content": t.system.format(input="")}] if t.system else []
    for user, assistant in t.shots:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs + [{"role": "user", "content": cfg.data.synth.instruction or CONTEXT_INSTRUCTION}]


def check_room(cfg: Config, tok, win: int) -> None:
    """Fail before any work when the context leaves no room in the window: the teacher prompt with an input of
    data.synth.max_new_tokens tokens (the longest a synthesised input can be) plus generation.max_new_tokens,
    and, for prompt = 'context', the synthesis prompt plus data.synth.max_new_tokens."""
    from ctxdistill.core.templates import chat_text, encode, teacher_template

    sc = cfg.data.synth
    base = len(teacher_template(cfg.task).render(tok, "")[0])
    need = base + sc.max_new_tokens + cfg.generation.max_new_tokens
    if need > win:
        raise UserError(f"task.teacher_system: the teacher prompt is {base} tokens before any input; with inputs of up "
                        f"to {sc.max_new_tokens} tokens (data.synth.max_new_tokens) and generation.max_new_tokens "
                        f"{cfg.generation.max_new_tokens} it needs {need}, over the model window of {win} tokens: "
                        "shorten the prompt or those settings")
    if sc.prompt == "context":
        ask = len(encode(tok, chat_text(tok, context_messages(cfg))))
        if ask + sc.max_new_tokens > win:
            raise UserError(f"task.teacher_system: the synthesis prompt is {ask} tokens; with data.synth.max_new_tokens "
                            f"{sc.max_new_tokens} it is over the model window of {win} tokens")


def synthesize(cfg: Config, seeds: list[str], eval_inputs: list[str], n: int | None = None) -> tuple[list[dict], dict]:
    """Sample up to `n` (default `cfg.data.synth.n`) unique new inputs from the model; return rows and stats.

    prompt = 'seeds' (the paper, App. B): 'generate diverse and high quality inputs for the {task} task' then
    `per_prompt` seeds in a random order as "Input: ..." lines, ending with "Input:"; the candidate is the
    first line of the completion. prompt = 'context': the teacher's context as the system prompt (and its
    few-shot turns), asked for one user message; the candidate is the first line of the reply."""
    from ctxdistill.core import models
    from ctxdistill.core.progress import bar, log, warn
    from ctxdistill.core.sampling import generate, prefix_for
    from ctxdistill.core.templates import chat_text, encode

    sc = cfg.data.synth
    n = sc.n if n is None else n
    from_context = sc.prompt == "context"
    seeds = list(dict.fromkeys(seeds))
    if not from_context and len(seeds) < 2:
        raise UserError(f"data.synth: need at least 2 distinct seed inputs to synthesise from, got {len(seeds)}")
    per_prompt = min(sc.per_prompt, len(seeds))
    budget = sc.budget or 4 * n
    task = sc.task or cfg.task.name
    tok = models.load_tokenizer(cfg.model.name)
    model = models.load_model(cfg.model)
    check_room(cfg, tok, models.window(model, cfg.model))
    if from_context:
        chat_ids = encode(tok, chat_text(tok, context_messages(cfg)))
    else:
        instruction = (sc.instruction or SEEDS_INSTRUCTION).format(task=task)
        chat_ids = encode(tok, chat_text(tok, [{"role": "user", "content": instruction}]))
    seen_seed = {normalise_candidate(s).casefold() for s in seeds}
    seen_eval = {normalise_candidate(e).casefold() for e in eval_inputs}
    rng = random.Random(sc.seed)
    accepted: dict[str, str] = {}
    rejected: Counter = Counter()
    duplicates = generated = unused = 0
    log(f"inputs: synthesising {n} inputs for {task!r} " + ("behind the teacher's context" if from_context else
        f"from {len(seeds)} seeds") + f" (budget {budget} generations)")
    with bar("inputs: synthesise", n) as advance:
        rnd = 0
        while len(accepted) < n and generated < budget:
            batch = min(sc.batch_size, budget - generated)
            if from_context:  # one prompt, sampled many times: its whole KV is shared
                prompts = [chat_ids] * batch
            else:
                prompts = []
                for _ in range(batch):  # a random permutation of seeds per generation
                    shown = rng.sample(seeds, per_prompt)
                    prompts.append(chat_ids + encode(tok, "".join(f"Input: {x}\n" for x in shown) + "Input:"))
            prefix = prefix_for(model, prompts)
            outs = generate(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                            max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, batch_size=batch,
                            seed=sc.seed * 1_000_003 + rnd, desc="inputs: sample", prefix=prefix)
            rnd += 1
            generated += batch
            for ids, finished in outs:
                if len(accepted) >= n:  # the rest of this batch is not needed
                    unused += 1
                    continue
                cand, reason = screen(tok.decode(ids, skip_special_tokens=True), finished, sc, seen_seed, seen_eval)
                if reason:
                    rejected[reason] += 1
                elif cand.casefold() in accepted:
                    duplicates += 1
                else:
                    accepted[cand.casefold()] = cand
                    advance()
    texts = list(accepted.values())
    stats = {"requested": n, "prompt": sc.prompt, "accepted": len(texts), "generated": generated,
             "duplicates": duplicates, "rejected": dict(rejected), "unused": unused, "acceptance_rate": round(len(texts) / max(generated, 1), 4),
             "distinct_1": round(distinct_n(texts, 1), 4), "distinct_2": round(distinct_n(texts, 2), 4),
             "budget": budget, "budget_exhausted": len(texts) < n}
    if not texts:
        raise UserError(f"data.synth: no input accepted out of {generated} generations "
                        f"(duplicates {duplicates}, rejected {dict(rejected)}); check the seeds and data.synth")
    if len(texts) < n:
        warn(f"inputs: accepted only {len(texts)} of {n}: the budget of {budget} generations ran out "
            f"(duplicates {duplicates}, rejected {dict(rejected)}); writing the {len(texts)} accepted")
    rows = [{"id": f"synth-{i:06d}", "input": t} for i, t in enumerate(texts)]
    return rows, stats
