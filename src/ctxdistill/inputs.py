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
from ctxdistill.core.files import read_jsonl_numbered, write_atomic, write_jsonl


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
    facts = read_facts(cfg.path(d.facts)) if d.facts else []
    if facts:
        source["facts"] = hashlib.sha256(json.dumps([f["input"] for f in facts]).encode()).hexdigest()[:16]
    if d.inputs == "synthesize":
        seed_rows = read_seeds(cfg.path(d.synth.seeds)) if d.synth.seeds else train[:d.synth.n_seeds]
        source["synth"] = dataclasses.asdict(d.synth)
        source["synth_seed_inputs"] = [r["input"] for r in seed_rows]
        source["eval_inputs_sha"] = hashlib.sha256(json.dumps([r["input"] for r in evals]).encode()).hexdigest()[:16]
        if d.synth.prompt in ("context", "passages"):  # the candidates are asked for from the teacher's context
            source["context_sha"] = hashlib.sha256(json.dumps(context_messages(cfg)).encode()).hexdigest()[:16]
            source["model"] = cfg.model.name
        old = out / "stats.json"
        if old.is_file() and (out / "train.jsonl").is_file() and json.loads(old.read_text()).get("source") == source:
            return json.loads(old.read_text())  # the same synthesis already ran: reuse it
        n_eval = d.n_eval if d.prompt_only else 0
        train, synth_stats = synthesize(cfg, [r["input"] for r in seed_rows], [r["input"] for r in evals],
                                        n=d.synth.n + n_eval, facts=[f["input"] for f in facts], n_held=n_eval)
        if d.prompt_only:
            train, evals = hold_out(train, n_eval, d.seed, cfg.data.synth)
    # A fact question is never trained on: training inputs equal to one are dropped and counted (synthesis
    # already rejects them; this catches a train file).
    asked = {normalise_candidate(f["input"]).casefold() for f in facts}
    n_before = len(train)
    train = [r for r in train if normalise_candidate(r["input"]).casefold() not in asked]
    overlap = {r["input"] for r in train} & {r["input"] for r in evals}
    stats = {"source": source, "n_train": len(train), "n_eval": len(evals), "train_eval_overlap": len(overlap)}
    if facts:
        stats["n_facts"] = len(facts)
        stats["train_equal_to_a_fact_question"] = n_before - len(train)
        if n_before > len(train):
            from ctxdistill.core.progress import warn

            warn(f"inputs: dropped {n_before - len(train)} training input(s) equal to a question of data.facts "
                 "(a fact question is never trained on)")
    if d.inputs == "synthesize":
        stats["synth"] = synth_stats
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    if facts:
        write_jsonl(out / "facts.jsonl", facts)
    else:
        (out / "facts.jsonl").unlink(missing_ok=True)
    write_atomic(out / "stats.json", json.dumps(stats, indent=2))
    return stats


def prepare_on_main(cfg: Config) -> None:
    """prepare_inputs for a command that runs stages: on the main process of a multi-process run, while the other
    ranks wait for its files (one process: at once)."""
    from ctxdistill.core import distributed

    with distributed.main_first("inputs: prepared"):
        if distributed.is_main():
            prepare_inputs(cfg)


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


def read_facts(path: Path) -> list[dict]:
    """The closed-book fact questions (data.facts): JSONL of {"input": question, "answer": a string or a list of
    accepted strings} (optional "id", "fact": a name grouping the questions that ask for one fact), as rows
    {"id", "input", "answer": [...], "fact"}. Every mistake is one line naming the file, line and field."""
    rows = []
    for n, r in read_jsonl_numbered(path, ("input", "answer")):
        where = f"{path}:{n}"
        if not isinstance(r["input"], str) or not r["input"].strip():
            raise UserError(f"{where}: 'input' must be a non-empty string")
        ans = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        if not ans or not all(isinstance(a, str) for a in ans):
            raise UserError(f"{where}: 'answer' must be a string or a non-empty list of strings")
        if any(not a.strip() for a in ans):
            raise UserError(f"{where}: 'answer' holds an empty string (it would match every reply)")
        fact = r.get("fact", r.get("id", f"{path.stem}-{n}"))
        if not isinstance(fact, str):
            raise UserError(f"{where}: 'fact' must be a string")
        rows.append({"id": str(r.get("id", f"{path.stem}-{n}")), "input": r["input"].strip(),
                     "answer": [a.strip() for a in ans], "fact": fact})
    seen: dict[str, int] = {}
    for row in rows:
        if row["id"] in seen:
            raise UserError(f"{path}: duplicate id {row['id']!r}")
        seen[row["id"]] = 1
    return rows


def read_lines(path: Path, what: str) -> list[dict]:
    """Inputs from a text file, one per line (blank lines skipped), as rows {"id": "<stem>-<line>", "input"}."""
    from ctxdistill.config import read_text_file

    lines = read_text_file(path, what).splitlines()
    return [{"id": f"{path.stem}-{n}", "input": line.strip()} for n, line in enumerate(lines, 1) if line.strip()]


def hold_out(rows: list[dict], n_eval: int, seed: int, sc) -> tuple[list[dict], list[dict]]:
    """(train, eval): n_eval rows drawn at random (seed) are held out, the rest kept in order. With self-study
    inputs, they are drawn from the 'general' ones (messages a user might send)."""
    pool = [i for i, r in enumerate(rows) if r.get("kind") == "general"]
    if any("kind" in r for r in rows) and len(pool) >= n_eval:
        picked = set(random.Random(seed).sample(pool, n_eval))
        return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]
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


def screen(text: str, finished: bool, sc, seen_seed: set[str], seen_eval: set[str],
           seen_facts: frozenset[str] = frozenset()) -> tuple[str, str | None]:
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
    if key in seen_facts:
        return cand, "equals a facts question"
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
    if sc.prompt == "context" or (sc.prompt == "passages" and "general" in sc.kinds):
        ask = len(encode(tok, chat_text(tok, context_messages(cfg))))
        if ask + sc.max_new_tokens > win:
            raise UserError(f"task.teacher_system: the synthesis prompt is {ask} tokens; with data.synth.max_new_tokens "
                            f"{sc.max_new_tokens} it is over the model window of {win} tokens")


class _Pool:
    """The accepted candidates and the count of every one turned away (screen's reasons, duplicates)."""

    def __init__(self, sc, seeds: list[str], eval_inputs: list[str], facts: list[str]):
        self.sc = sc
        self.seen_seed = {normalise_candidate(x).casefold() for x in seeds}
        self.seen_eval = {normalise_candidate(x).casefold() for x in eval_inputs}
        self.seen_facts = frozenset(normalise_candidate(x).casefold() for x in facts)
        self.accepted: dict[str, dict] = {}  # case-folded text -> row fields (input, and kind / passage)
        self.rejected: Counter = Counter()
        self.duplicates = 0

    def offer(self, text: str, finished: bool, **fields) -> bool:
        cand, reason = screen(text, finished, self.sc, self.seen_seed, self.seen_eval, self.seen_facts)
        if reason:
            self.rejected[reason] += 1
        elif cand.casefold() in self.accepted:
            self.duplicates += 1
        else:
            self.accepted[cand.casefold()] = {"input": cand, **fields}
            return True
        return False


def synthesize(cfg: Config, seeds: list[str], eval_inputs: list[str], n: int | None = None,
               facts: list[str] = (), n_held: int = 0) -> tuple[list[dict], dict]:
    """Sample up to `n` (default `cfg.data.synth.n`) unique new inputs from the model; return rows and stats.
    Candidates equal to a seed, an eval input or a fact question (`facts`) are rejected and counted.

    prompt = 'seeds' (the paper, App. B): 'generate diverse and high quality inputs for the {task} task' then
    `per_prompt` seeds in a random order as "Input: ..." lines, ending with "Input:"; the candidate is the
    first line of the completion. prompt = 'context': the teacher's context as the system prompt (and its
    few-shot turns), asked for one user message; the candidate is the first line of the reply. prompt =
    'passages': self-study, every passage of the context its share of each kind (`synthesize_passages`); the
    `n_held` of `n` to be held out for evaluation are all 'general' messages there, like the users' own."""
    from ctxdistill.core import models
    from ctxdistill.core.progress import bar, log, warn
    from ctxdistill.core.templates import chat_text, encode

    sc = cfg.data.synth
    n = sc.n if n is None else n
    from_context = sc.prompt == "context"
    seeds = list(dict.fromkeys(seeds))
    if sc.prompt == "seeds" and len(seeds) < 2:
        raise UserError(f"data.synth: need at least 2 distinct seed inputs to synthesise from, got {len(seeds)}")
    per_prompt = min(sc.per_prompt, len(seeds))
    budget = sc.budget or 4 * n
    task = sc.task or cfg.task.name
    tok = models.load_tokenizer(cfg.model.name)
    model = models.load_model(cfg.model)
    check_room(cfg, tok, models.window(model, cfg.model))
    pool = _Pool(sc, seeds, eval_inputs, facts)
    extra: dict = {}
    if sc.prompt == "passages":
        generated, unused, extra = synthesize_passages(cfg, model, tok, pool, seeds, n, budget, n_held)
    else:
        if from_context:
            chat_ids = encode(tok, chat_text(tok, context_messages(cfg)))
        else:
            instruction = (sc.instruction or SEEDS_INSTRUCTION).format(task=task)
            chat_ids = encode(tok, chat_text(tok, [{"role": "user", "content": instruction}]))
        rng = random.Random(sc.seed)
        generated = unused = 0
        log(f"inputs: synthesising {n} inputs for {task!r} " + ("behind the teacher's context" if from_context else
            f"from {len(seeds)} seeds") + f" (budget {budget} generations)")
        with bar("inputs: synthesise", n) as advance:
            rnd = 0
            while len(pool.accepted) < n and generated < budget:
                batch = min(sc.batch_size, budget - generated)
                if from_context:  # one prompt, sampled many times: its whole KV is shared
                    prompts = [chat_ids] * batch
                else:
                    prompts = []
                    for _ in range(batch):  # a random permutation of seeds per generation
                        shown = rng.sample(seeds, per_prompt)
                        prompts.append(chat_ids + encode(tok, "".join(f"Input: {x}\n" for x in shown) + "Input:"))
                outs = sample_lines(model, tok, prompts, sc, round_no=rnd)
                rnd += 1
                generated += batch
                for text, finished in outs:
                    if len(pool.accepted) >= n:  # the rest of this batch is not needed
                        unused += 1
                    elif pool.offer(text, finished):
                        advance()
    rows_fields = list(pool.accepted.values())
    texts = [r["input"] for r in rows_fields]
    by_model = len(texts) - extra.get("rule_built", 0)
    stats = {"requested": n, "prompt": sc.prompt, "accepted": len(texts), "generated": generated,
             "duplicates": pool.duplicates, "rejected": dict(pool.rejected), "unused": unused,
             "acceptance_rate": round(by_model / max(generated, 1), 4),  # of the model's generations
             "distinct_1": round(distinct_n(texts, 1), 4), "distinct_2": round(distinct_n(texts, 2), 4),
             "budget": budget, "budget_exhausted": len(texts) < n, **extra}
    if not texts:
        raise UserError(f"data.synth: no input accepted out of {generated} generations "
                        f"(duplicates {pool.duplicates}, rejected {dict(pool.rejected)}); check the seeds and data.synth")
    if len(texts) < n:
        warn(f"inputs: accepted only {len(texts)} of {n}: the budget of {budget} generations ran out "
             f"(duplicates {pool.duplicates}, rejected {dict(pool.rejected)}); writing the {len(texts)} accepted")
    rows = [{"id": f"synth-{i:06d}", **r} for i, r in enumerate(rows_fields)]
    return rows, stats


def sample_lines(model, tok, prompts: list[list[int]], sc, round_no: int,
                 temperature: float | None = None) -> list[tuple[str, bool]]:
    """One sampled completion per prompt (data.synth's temperature, unless given, and length), decoded: (text,
    finished). Prompts sharing a long prefix (the context) have it encoded once."""
    from ctxdistill.core import models
    from ctxdistill.core.sampling import generate, prefix_for

    outs = generate(model, prompts, pad_id=tok.pad_token_id, eos_id=models.stop_ids(tok), max_new_tokens=sc.max_new_tokens,
                    temperature=sc.temperature if temperature is None else temperature, batch_size=sc.batch_size,
                    seed=sc.seed * 1_000_003 + round_no,
                    desc="inputs: sample", prefix=prefix_for(model, prompts))
    return [(tok.decode(c.ids, skip_special_tokens=True), c.finished) for c in outs]


def synthesize_passages(cfg: Config, model, tok, pool: _Pool, seeds: list[str], n: int, budget: int,
                        n_held: int = 0) -> tuple[int, int, dict]:
    """prompt = 'passages' (self-study, selfstudy.py): the context's passages each get an equal share of every
    passage kind in data.synth.kinds, and 'general' its share of all n. Rule-built kinds are taken first; a
    rule cell with too few distinct messages passes its shortfall to the model-written kinds of its passage.
    Returns (generations, generations not needed, stats: passages with their counts by kind, counts by kind,
    shortfalls)."""
    from ctxdistill import selfstudy
    from ctxdistill.prompts import context_text
    from ctxdistill.core.progress import bar, log
    from ctxdistill.core.templates import chat_text, encode

    sc = cfg.data.synth
    passages = selfstudy.split_passages(context_text(cfg), sc.passage_words)
    quota = selfstudy.plan(n - n_held, len(passages), list(sc.kinds), sc.general_share)
    if n_held:  # the held-out inputs: messages a user might send, not questions built from the context
        quota[-1, "general"] = quota.get((-1, "general"), 0) + n_held
    rng = random.Random(sc.seed)
    have: Counter = Counter()
    log(f"inputs: self-study, {n} inputs over {len(passages)} passages of the context, kinds {', '.join(sc.kinds)} "
        f"(budget {budget} generations)")
    shortfall: dict[str, int] = {}
    with bar("inputs: synthesise", n) as advance:
        for (i, kind), q in quota.items():
            if kind not in selfstudy.RULE_KINDS:
                continue
            for msg in selfstudy.rule_messages(passages[i], kind, rng):
                if have[i, kind] >= q:
                    break
                target = {"target": passages[i].text} if kind == "recite" else {}  # answered by the passage itself
                if pool.offer(msg, True, kind=kind, passage=i, **target):
                    have[i, kind] += 1
                    advance()
            if have[i, kind] < q:  # this passage has too few facts for its share: the model writes the rest
                shortfall[f"{i}:{kind}"] = q - have[i, kind]
                written = [k for k in sc.kinds if k not in selfstudy.RULE_KINDS and k != "general"]
                takers = [(i, k) for k in written] or ([(-1, "general")] if "general" in sc.kinds else [])
                for j in range(q - have[i, kind]):
                    if takers:
                        quota[takers[j % len(takers)]] = quota.get(takers[j % len(takers)], 0) + 1
                quota[i, kind] = have[i, kind]
        general_ids = encode(tok, chat_text(tok, context_messages(cfg)))
        questions = {p.index: selfstudy.detail_questions(p, p.common) for p in passages}
        for (i, kind), q in list(quota.items()):  # nothing to rewrite: the passage's share goes to 'general'
            if kind == "paraphrase" and not questions[i] and q:
                shortfall[f"{i}:{kind}"] = q
                quota[i, kind] = 0
                if "general" in sc.kinds:
                    quota[-1, "general"] += q

        def prompt_for(i: int, kind: str) -> list[int]:
            if kind == "general":
                return general_ids
            p = passages[i]
            if kind == "paraphrase":
                user, cont = selfstudy.paraphrase_prompt(rng.choice(questions[i]),
                                                         rng.sample(selfstudy.PARAPHRASE_DEMOS, 3))
                return encode(tok, chat_text(tok, [{"role": "user", "content": user}])) + encode(tok, cont)
            if kind == "detail_model":
                return encode(tok, chat_text(tok, [{"role": "user", "content": selfstudy.detail_model_prompt(p)}]))
            pool_demos = seeds or selfstudy.detail_questions(p, p.common) or selfstudy.restate_requests(p)
            user, cont = selfstudy.task_prompt(p, rng.sample(pool_demos, min(2, len(pool_demos))))
            return encode(tok, chat_text(tok, [{"role": "user", "content": user}])) + encode(tok, cont)

        generated = unused = rnd = 0
        written = sorted(c for c in quota if c[1] not in selfstudy.RULE_KINDS)
        while generated < budget:
            open_cells = [c for c in written if have[c] < quota[c]]
            if not open_cells:
                break
            for kind in dict.fromkeys(k for _, k in open_cells):  # one call per kind: 'general' shares its prefix
                jobs = [c for c in open_cells if c[1] == kind for _ in range(quota[c] - have[c])][:budget - generated]
                if not jobs:
                    continue
                outs = sample_lines(model, tok, [prompt_for(*c) for c in jobs], sc, round_no=rnd,
                                    temperature=selfstudy.PARAPHRASE_TEMPERATURE if kind == "paraphrase" else None)
                rnd += 1
                generated += len(jobs)
                for c, (text, finished) in zip(jobs, outs):
                    if have[c] >= quota[c]:
                        unused += 1
                    elif pool.offer(text, finished, kind=c[1], **({"passage": c[0]} if c[0] >= 0 else {})):
                        have[c] += 1
                        advance()
    by_kind = Counter()
    for (i, k), v in have.items():
        by_kind[k] += v
    return generated, unused, {"rule_built": sum(by_kind[k] for k in selfstudy.RULE_KINDS),
        "passages": [{"index": p.index, "words": len(p.text.split()), "topic": p.topic, "start": p.text[:60],
                      "counts": {k: have[p.index, k] for k in sc.kinds if k != "general"}} for p in passages],
        "by_kind": dict(by_kind), "shortfall_moved_to_model": shortfall}

