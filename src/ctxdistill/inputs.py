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
from collections import Counter
from pathlib import Path

from ctxdistill.config import Config
from ctxdistill.errors import UserError
from ctxdistill.files import read_jsonl, read_jsonl_numbered, write_atomic, write_jsonl


def prepare_inputs(cfg: Config) -> dict:
    """Load or split the task's inputs into `<out>/inputs/`; return the stats."""
    d = cfg.data
    if d.superni:
        from ctxdistill.tasks import superni

        task = superni.load(cfg.path(d.superni))
        train, evals = superni.split(task, d.n_eval, d.n_train, d.seed)
        source = {"superni": str(cfg.path(d.superni)), "n_eval": d.n_eval, "n_train": d.n_train, "seed": d.seed}
    else:
        train = read_rows(cfg.path(d.train), need_ref=False)
        evals = read_rows(cfg.path(d.eval), need_ref=True)
        source = {"train": str(cfg.path(d.train)), "eval": str(cfg.path(d.eval))}
    out = cfg.out / "inputs"
    if d.inputs == "synthesize":
        seed_rows = (read_rows(cfg.path(d.synth.seeds), need_ref=False)
                     if d.synth.seeds else train[:d.synth.n_seeds])
        source["synth"] = dataclasses.asdict(d.synth)
        source["synth_seed_inputs"] = [r["input"] for r in seed_rows]
        source["eval_inputs_sha"] = hashlib.sha256(json.dumps([r["input"] for r in evals]).encode()).hexdigest()[:16]
        old = out / "stats.json"
        if old.is_file() and (out / "train.jsonl").is_file() and json.loads(old.read_text()).get("source") == source:
            return json.loads(old.read_text())  # the same synthesis already ran: reuse it
        train, synth_stats = synthesize(cfg, [r["input"] for r in seed_rows], [r["input"] for r in evals])
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


def read_rows(path: Path, need_ref: bool) -> list[dict]:
    """Rows {"id", "input"} (+ "reference": [str, ...] with need_ref) of a JSONL file, checked line by line."""
    return _normalise(read_jsonl_numbered(path, ("input",)), path, need_ref)


def _normalise(rows: list[tuple[int, dict]], path: Path, need_ref: bool) -> list[dict]:
    out = []
    for n, r in rows:
        if not isinstance(r["input"], str) or not r["input"].strip():
            raise UserError(f"{path}:{n}: 'input' must be a non-empty string")
        row = {"id": str(r.get("id", f"{path.stem}-{n}")), "input": r["input"]}
        if need_ref:
            ref = r.get("reference", r.get("references", r.get("output")))
            if ref is None:
                raise UserError(f"{path}:{n}: eval inputs need a 'reference' (a string or a list of strings)")
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

def normalise_candidate(text: str) -> str:
    """One line, single spaces, no surrounding quotes or list markers."""
    line = " ".join(text.split())
    return line.strip(" \"'`").removeprefix("- ").strip()


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
    if len(cand) < sc.min_chars:
        return cand, "too short"
    if len(cand) > sc.max_chars:
        return cand, "too long"
    if key in seen_seed:
        return cand, "equals a seed input"
    if key in seen_eval:
        return cand, "equals an eval input"
    return cand, None


def synthesize(cfg: Config, seeds: list[str], eval_inputs: list[str]) -> tuple[list[dict], dict]:
    """Sample up to `cfg.data.synth.n` unique new inputs from the model; return rows and stats."""
    from ctxdistill import models
    from ctxdistill.progress import bar, log, warn
    from ctxdistill.sampling import generate, prefix_for
    from ctxdistill.templates import encode

    sc = cfg.data.synth
    seeds = list(dict.fromkeys(seeds))
    if len(seeds) < 2:
        raise UserError(f"data.synth: need at least 2 distinct seed inputs to synthesise from, got {len(seeds)}")
    per_prompt = min(sc.per_prompt, len(seeds))
    budget = sc.budget or 4 * sc.n
    task = sc.task or cfg.task.name
    tok = models.load_tokenizer(cfg.model.name)
    model = models.load_model(cfg.model)
    instruction = f"Generate diverse and high quality inputs for the {task} task."
    chat = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True) \
        if getattr(tok, "chat_template", None) else instruction + "\n\n"
    chat_ids = encode(tok, chat)
    seen_seed = {normalise_candidate(s).casefold() for s in seeds}
    seen_eval = {normalise_candidate(e).casefold() for e in eval_inputs}
    rng = random.Random(sc.seed)
    accepted: dict[str, str] = {}
    rejected: Counter = Counter()
    duplicates = generated = 0
    log(f"inputs: synthesising {sc.n} inputs for {task!r} from {len(seeds)} seeds (budget {budget} generations)")
    with bar("inputs: synthesise", sc.n) as advance:
        rnd = 0
        while len(accepted) < sc.n and generated < budget:
            batch = min(sc.batch_size, budget - generated)
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
                if len(accepted) >= sc.n:
                    break
                cand, reason = screen(tok.decode(ids, skip_special_tokens=True), finished, sc, seen_seed, seen_eval)
                if reason:
                    rejected[reason] += 1
                elif cand.casefold() in accepted:
                    duplicates += 1
                else:
                    accepted[cand.casefold()] = cand
                    advance()
    texts = list(accepted.values())
    stats = {"requested": sc.n, "accepted": len(texts), "generated": generated, "duplicates": duplicates,
             "rejected": dict(rejected), "acceptance_rate": round(len(texts) / max(generated, 1), 4),
             "distinct_1": round(distinct_n(texts, 1), 4), "distinct_2": round(distinct_n(texts, 2), 4),
             "budget": budget, "budget_exhausted": len(texts) < sc.n}
    if not texts:
        raise UserError(f"data.synth: no input accepted out of {generated} generations "
                        f"(duplicates {duplicates}, rejected {dict(rejected)}); check the seeds and data.synth")
    if len(texts) < sc.n:
        warn(f"inputs: accepted only {len(texts)} of {sc.n}: the budget of {budget} generations ran out "
            f"(duplicates {duplicates}, rejected {dict(rejected)}); writing the {len(texts)} accepted")
    rows = [{"id": f"synth-{i:06d}", "input": t} for i, t in enumerate(texts)]
    return rows, stats
