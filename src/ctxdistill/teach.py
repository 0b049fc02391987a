"""Stage 2, teach: the frozen teacher answers with context, and its soft labels are stored.

For each input x (paper §2, App. B):
  1. y ~ p(. | T_teacher(x)): sample the teacher's completion (scratchpad + answer).
  2. a = f(y): extract the answer; drop and count the example if f fails.
  3. Score [T_teacher(x), y up to a, a] and keep, at each answer token, the teacher's top-k log-probs
     plus the tail mass. When those are the very tokens the teacher generated (the usual case), the
     distributions recorded while sampling are used; otherwise the sequence is rescored in one pass. The answer tokens are the *same ids* the student will emit (checked), and the
     terminator is left to a hard label at training time (DESIGN.md §4: a soft label there teaches the
     student never to stop, because the teacher wants to keep talking after the answer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
from collections import Counter

import torch

from ctxdistill.core import distributed, models
from ctxdistill.config import Config
from ctxdistill.core.errors import UserError
from ctxdistill.core.extract import extract
from ctxdistill.core.files import sha256_file
from ctxdistill.inputs import load_split
from ctxdistill.core.progress import bar, log
from ctxdistill.core.sampling import Labels, PrefixCache, example_seed, generate, prefix_for, score_answers
from ctxdistill.store import Example, ShardedStore, hash_fields
from ctxdistill.core.templates import Template, encode, student_template, teacher_template


def store_hashes(cfg: Config) -> dict:
    """Per-field content hashes of everything that determines the distillation set."""
    train_file = cfg.out / "inputs" / "train.jsonl"
    return hash_fields({
        "model": models.fingerprint(cfg.model.name) + ":" + cfg.model.dtype,
        "teacher_template": [cfg.task.teacher_system, cfg.task.teacher, cfg.task.teacher_prefill]
                            + ([cfg.task.teacher_shots] if cfg.task.teacher_shots else []),  # old stores keep their hash
        "student_template": [cfg.task.student_system, cfg.task.student, cfg.task.student_prefill],
        "extractor": {k: v for k, v in dataclasses.asdict(cfg.task.extractor).items()
                      if k != "keep_unfinished" or v},  # stores made before the field keep their hash
        "generation": dataclasses.asdict(cfg.generation),
        "teach": {"top_k": cfg.teach.top_k, "seed": cfg.teach.seed, "truncate": cfg.teach.truncate,
                  "max_length": cfg.model.max_length, "seeding": "per input id",  # earlier stores: per shard
                  **({"samples": cfg.teach.samples, "select": cfg.teach.select, "checks": cfg.task.checks}
                     if cfg.teach.samples > 1 else {}),  # stores with no selection keep their hash
                  **({"context": "passage+instructions", "passage_words": cfg.data.synth.passage_words}
                     if cfg.teach.context == "passage" else {}),
                  **({"fact_temperature": cfg.teach.fact_temperature}
                     if cfg.data.inputs == "synthesize" and cfg.data.synth.prompt == "passages" else {})},
        "inputs": sha256_file(train_file)[:16] if train_file.is_file() else None,
    })


def fit_prompt(tpl: Template, tok, x: str, *, window: int, max_new_tokens: int, truncate: bool,
               what: str) -> tuple[list[int], str, bool]:
    """Render `tpl` for x so that the prompt plus `max_new_tokens` fit in `window`: fail with both lengths
    named, or (only when asked) shorten x. Returns the prompt ids, the input used, whether it was shortened."""
    budget = window - max_new_tokens
    ids, _ = tpl.render(tok, x)
    if len(ids) <= budget:
        return ids, x, False
    if not truncate:
        raise UserError(f"{what} prompt for input {x[:40]!r} is {len(ids)} tokens; with max_new_tokens "
                        f"{max_new_tokens} it needs {len(ids) + max_new_tokens}, over the model window of {window} "
                        "tokens (nothing is truncated silently: shorten it or set teach.truncate = true)")
    x_ids = encode(tok, x)
    over = len(ids) - budget
    while over > 0 and x_ids:
        x_ids = x_ids[:max(0, len(x_ids) - over)]
        x = tok.decode(x_ids)
        ids, _ = tpl.render(tok, x)
        over = len(ids) - budget
    if over > 0:
        raise UserError(f"{what} template alone is {len(ids)} tokens; with max_new_tokens {max_new_tokens} it "
                        f"does not fit the model window of {window} tokens")
    return ids, x, True


def align_answer(tok, prefix: str, answer: str) -> tuple[str, str, list[int]] | None:
    """Split assistant text at a clean token boundary: (prefix, answer, answer ids), or None.

    BPE merges a leading space into the next word (" Paris"), so whitespace at the end of the prefix
    moves into the answer first. The ids must satisfy tok(prefix + answer) == tok(prefix) + ids: the
    ids the teacher is scored on are exactly those a natural tokenisation of its own text gives.
    """
    stripped = prefix.rstrip()
    answer = prefix[len(stripped):] + answer
    pre, joint = encode(tok, stripped), encode(tok, stripped + answer)
    if joint[:len(pre)] != pre or len(joint) == len(pre):
        return None
    return stripped, answer, joint[len(pre):]


def fit_prompts(cfg: Config, tok, row: dict, win: int) -> tuple[list[int], list[int], bool]:
    """Teacher and student prompt ids for one input row, each fitted to the window (see fit_prompt).
    Records the inputs as used in row['teacher_input'] / row['student_input']."""
    kw = dict(window=win, max_new_tokens=cfg.generation.max_new_tokens, truncate=cfg.teach.truncate)
    t_ids, row["teacher_input"], cut_t = fit_prompt(row_teacher_template(cfg, row), tok, row["input"], what="teacher", **kw)
    s_ids, row["student_input"], cut_s = fit_prompt(student_template(cfg.task), tok, row["input"], what="student", **kw)
    return t_ids, s_ids, cut_t or cut_s


FACT_KINDS = ("detail", "paraphrase", "detail_model")  # self-study questions about one fact


def context_group(cfg: Config, row: dict) -> str:
    """Which context the teacher answers a training input with: 'passage' for a self-study question about one
    fact of a passage when teach.context = 'passage' (the passage gives the fact; measured, the small teacher
    states it more often so), else 'whole' (every other input learns the voice of the whole context)."""
    p = row.get("passage")
    passage = cfg.teach.context == "passage" and row.get("kind") in FACT_KINDS and isinstance(p, int) and p >= 0
    return "passage" if passage else "whole"


def row_temperature(cfg: Config, row: dict) -> float:
    """The teacher's sampling temperature for a training input: teach.fact_temperature for a self-study
    question about one fact (a fact has one right answer: the greedy teacher states the asked one 56% of the
    time, at temperature 1 6%, docs/results.md), generation.temperature for every other."""
    return cfg.teach.fact_temperature if row.get("kind") in FACT_KINDS else cfg.generation.temperature


@functools.lru_cache(maxsize=8)
def _passages(text: str, words: int) -> tuple[tuple, frozenset]:
    """The context's passages, and the indices of those that instruct the assistant."""
    from ctxdistill.selfstudy import is_instructions, split_passages

    ps = tuple(split_passages(text, words))
    return ps, frozenset(j for j, p in enumerate(ps) if is_instructions(p))


def row_teacher_template(cfg: Config, row: dict) -> Template:
    """The teacher template for one training input: the task's (the whole context), or with teach.context =
    'passage', for an input built from passage i, as the system prompt: the context's opening passage (where a
    prompt sets the role and the rules), the other passages that instruct the assistant ("Remember: begin your
    reply with ...", selfstudy.is_instructions) and passage i, in the context's order. A short context the small
    teacher reads better (docs/results.md: the asked fact stated 56% of the time against 38% with the whole
    prompt), which keeps the prompt's rules for the voice."""
    t = teacher_template(cfg.task)
    if context_group(cfg, row) == "whole":
        return t
    from ctxdistill.config import template_literal
    from ctxdistill.inputs import context_text

    ps, rules = _passages(context_text(cfg), cfg.data.synth.passage_words)
    i = row["passage"]
    if i >= len(ps):
        raise UserError(f"teach.context = 'passage': input {row['id']} names passage {i}, but the context has "
                        f"{len(ps)}; rerun the inputs stage (the context or data.synth.passage_words changed)")
    text = "\n\n".join(p.text for j, p in enumerate(ps) if j in (0, i) or j in rules)
    return dataclasses.replace(t, system=template_literal(text), shots=())


def teach(cfg: Config, overwrite: bool = False, prefix_reuse: bool = True) -> dict:
    """Run the teacher pass into `<out>/teacher/`, shard by shard; return the manifest.

    An identical complete store is reused; a partial one (a killed run) resumes after its last complete
    shard; one made from different inputs is refused unless `overwrite`.
    """
    with distributed.main_first("inputs: prepared"):  # every rank takes part, so the barriers pair up
        # the main process writes the inputs if missing; the other ranks then read the same files
        train_rows = load_split(cfg, "train")
    with distributed.main_first("teach: open the store"):  # only the main process replaces or starts it
        store = ShardedStore(cfg.out / "teacher", store_hashes(cfg), overwrite=overwrite and distributed.is_main())
        done = store.manifest()
        if done is None and distributed.is_main():
            store.begin()
    if done is not None:
        log(f"teach: {store.path} is up to date (hash {store.hashes['all']}); reusing it")
        return done
    try:
        return _teach(cfg, train_rows, store, prefix_reuse)
    except BaseException:
        if distributed.is_main():
            store.discard_if_empty()
        raise


def _teach(cfg: Config, train_rows: list[dict], store: ShardedStore, prefix_reuse: bool) -> dict:
    tok = models.load_tokenizer(cfg.model.name)
    model = models.load_model(cfg.model)
    win = models.window(model, cfg.model)
    n_truncated = 0
    prompts, student_prompts = [], []
    for row in train_rows:
        t_ids, s_ids, cut = fit_prompts(cfg, tok, row, win)
        n_truncated += cut
        prompts.append(t_ids)
        student_prompts.append(s_ids)
    # Rows answered with the same context share its KV cache: one prefix per context group (teach.context).
    # Rows are taught in groups: by the context they are answered with, and at what temperature.
    groups = [(context_group(cfg, row), row_temperature(cfg, row)) for row in train_rows]
    prefixes = {g: prefix_for(model, [p for p, h in zip(prompts, groups) if h == g], enabled=prefix_reuse)
                for g in dict.fromkeys(groups)}
    prefix = next((v for (c, _), v in prefixes.items() if c == "whole"), next(iter(prefixes.values()), None))
    n_shared = len(prefix) if prefix else 0
    best_of = f" (each the best of {cfg.teach.samples} at temperature > 0)" if cfg.teach.samples > 1 else ""
    log(f"teach: {len(train_rows)} inputs x {cfg.generation.samples_per_input} sample(s){best_of} on "
        f"{cfg.model.name}, window {win}, {len(prefixes)} context group(s), shared prefix {n_shared} tokens"
        f"{' (reused)' if prefix else ''}")

    m = cfg.teach.shard_size
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1:
        log(f"teach: rank {rank} of {world} computes shards {rank}, {rank + world}, ...")
    shards = []
    with bar("teacher", len(train_rows)) as advance:  # drawn by the main process
        for i, start in enumerate(range(0, len(train_rows), m)):
            if i % world != rank:  # another rank's shard
                continue
            stats = store.shard_stats(i)
            if stats is None:
                rows = train_rows[start:start + m]
                examples, drops, probs, selection = [], Counter(), [], None
                for g, prefix in prefixes.items():  # one group at a time (one, but for self-study inputs)
                    idx = [j for j in range(start, start + len(rows)) if groups[j] == g]
                    if idx:
                        ex, dr, pr, sel = teach_rows(
                            model, tok, cfg, [train_rows[j] for j in idx], [prompts[j] for j in idx],
                            [student_prompts[j] for j in idx], win=win, prefix=prefix, temperature=g[1])
                        examples, probs, selection = examples + ex, probs + pr, _merge_selection(selection, sel)
                        drops.update(dr)
                stats = store.write_shard(i, examples, {
                    **({"selection": selection} if selection else {}),
                    "inputs": [start, start + len(rows)], "dropped": dict(drops), "answer_prob_sum": sum(probs),
                    "answer_tokens": len(probs), "labels_recorded": sum(e.meta["labels"] == "recorded" for e in examples)})
            shards.append(stats)
            advance(stats["inputs"][1] - stats["inputs"][0])
    distributed.barrier("teach: every rank's shards written")
    if rank == 0:  # the main process writes the manifest from every rank's shards; the others then read it
        if world > 1:
            shards = [store.shard_stats(i) for i in range(math.ceil(len(train_rows) / m))]
            if any(st is None for st in shards):
                raise UserError(f"{store.path}: a rank's shard is missing or damaged after the barrier; rerun to redo it")
        manifest = _finish(cfg, train_rows, store, shards, n_truncated, n_shared, tok)
    distributed.barrier("teach: manifest written")
    if rank != 0:
        manifest = store.manifest()
        if manifest is None:
            raise UserError(f"{store.path}: the main process wrote no complete manifest")
    return manifest


def _merge_selection(a: dict | None, b: dict | None) -> dict | None:
    """The selection counts (`select_answers`) of two groups of rows, added."""
    if a is None or b is None:
        return a or b
    def add(x: dict, y: dict) -> dict:
        return {n: x.get(n, 0) + y.get(n, 0) for n in {**x, **y}}
    return {"candidates": a["candidates"] + b["candidates"], "kept": a["kept"] + b["kept"],
            **{k: add(a[k], b[k]) for k in ("passed_before", "passed_after", "candidates_dropped")}}


def _finish(cfg: Config, train_rows: list[dict], store: ShardedStore, shards: list[dict], n_truncated: int,
            n_shared: int, tok) -> dict:
    """Write the manifest from every shard's stats (the main process, once all shards are complete)."""
    n_jobs = len(train_rows) * cfg.generation.samples_per_input  # kept samples (each the best of teach.samples)
    drops = Counter()
    for st in shards:
        drops.update(st["dropped"])
    n_tokens = sum(st["answer_tokens"] for st in shards)
    if not n_tokens:
        reasons = ", ".join(f"{k}: {v}" for k, v in drops.items()) or "no inputs"
        shutil.rmtree(store.path)
        raise UserError(f"teach: no usable teacher answers out of {n_jobs} ({reasons}); "
                        "check task.extractor and the teacher template")
    mean_prob = sum(st["answer_prob_sum"] for st in shards) / n_tokens
    selection = None
    if cfg.teach.samples > 1:  # the rules' pass rates over every candidate, and over the ones kept
        sel = [st["selection"] for st in shards if st.get("selection")]
        cands, kept = sum(x["candidates"] for x in sel), sum(x["kept"] for x in sel)
        selection = {"samples": cfg.teach.samples, "rules": cfg.teach.select, "candidates": cands, "kept": kept,
                     "pass_rate_before": {k: round(sum(x["passed_before"][k] for x in sel) / max(cands, 1), 4)
                                          for k in (sel[0]["passed_before"] if sel else {})},
                     "pass_rate_after": {k: round(sum(x["passed_after"][k] for x in sel) / max(kept, 1), 4)
                                         for k in (sel[0]["passed_after"] if sel else {})},
                     "candidates_dropped": dict(sum((Counter(x["candidates_dropped"]) for x in sel), Counter()))}
    manifest = store.finish(shards, {
        "config": cfg.to_dict(),
        "n_inputs": len(train_rows),
        "n_samples": n_jobs,
        "dropped": dict(drops),
        "extract_fail_rate": drops[EXTRACT_FAILED] / n_jobs,
        "n_truncated": n_truncated,
        "shared_prefix_tokens": n_shared,
        # examples whose soft labels were recorded while sampling (the rest took a scoring pass)
        "labels_recorded": sum(st.get("labels_recorded", 0) for st in shards),
        "teacher_mean_answer_prob": mean_prob,
        "terminator_id": models.turn_end_id(tok),  # the chat template's end of turn: what the student learns
        "top_k": cfg.teach.top_k,
        **({"selection": selection} if selection else {}),
    })
    log(f"teach: kept {manifest['n_examples']}/{n_jobs}, dropped {dict(drops) or 0}, "
        f"teacher mean p(answer token) = {mean_prob:.3f}")
    return manifest


EXTRACT_FAILED = "extractor matched nothing"


def teach_rows(model, tok, cfg: Config, rows: list[dict], prompts: list[list[int]], student_prompts: list[list[int]],
               *, win: int, prefix: PrefixCache | None,
               temperature: float | None = None) -> tuple[list[Example], Counter, list[float], dict | None]:
    """Steps 1-3 for some inputs: sample, extract and align, (select,) score. Returns examples, drops,
    answer-token probs, and with teach.samples > 1 the selection's counts (`select_answers`).

    Sample s of the input with id X is drawn with its own seed, from teach.seed, X and s (`example_seed`):
    the same whichever shard, batch or rank computes it, so any world size or shard size gives the same set
    (bit for bit with the same batches; otherwise up to float rounding from padding)."""
    t = cfg.generation.temperature if temperature is None else temperature
    candidates = cfg.teach.samples if t > 0 else 1  # greedy draws the same candidate every time
    kept, drops = sample_answers(model, tok, cfg, rows, prompts, student_prompts, win=win, prefix=prefix,
                                 seed=cfg.teach.seed, candidates=candidates, temperature=t)
    selection = None
    if candidates > 1:  # a sample is dropped only when every one of its candidates was
        kept, selection = select_answers(cfg, rows, kept)
        selection["candidates_dropped"] = dict(drops)
        lost = sum(1 if "target" in r else cfg.generation.samples_per_input for r in rows) - len(kept)
        drops = Counter({"every candidate dropped": lost} if lost else {})

    # 3. Soft labels: recorded while sampling, or one scoring pass for the rest.
    rescore = [a for a in kept if a.recorded is None]
    scored = iter(score_answers(model, [a.seq for a in rescore], [len(a.answer_ids) for a in rescore],
                                top_k=cfg.teach.top_k, pad_id=tok.pad_token_id, batch_size=cfg.teach.batch_size,
                                prefix=prefix))
    examples, probs = [], []
    for a in kept:
        if a.recorded is None:
            top_ids, top_lp, tail, p = next(scored)
        else:
            top_ids, top_lp, tail = (t.clone() for t in a.recorded[:3])
            p = a.recorded.chosen_logprob.exp()
        probs += p.tolist()
        row = rows[a.row]
        examples.append(Example(
            id=f"{row['id']}#{a.sample}", prompt_ids=student_prompts[a.row], answer_ids=a.answer_ids,
            topk_ids=top_ids, topk_logprobs=top_lp, tail_logmass=tail, terminated=a.finished,
            meta={"input": row["input"], "sample": a.sample, "answer": a.answer.strip(),
                  "completion": a.text, "answer_prob": round(float(p.mean()), 6),
                  "labels": "rescored" if a.recorded is None else "recorded",
                  **({} if a.finished else {"terminated": False}),
                  **({} if a.candidate is None else {"candidate": a.candidate})}))
    return examples, drops, probs, selection


def select_answers(cfg: Config, rows: list[dict], kept: list[Answer]) -> tuple[list[Answer], dict]:
    """teach.samples > 1: of each sample's candidates (sample s of an input drew candidates s*N .. s*N+N-1),
    keep the best by `checks.select_score` (the rules of teach.select; ties to the first drawn). Returns the
    kept answers, renumbered to their sample, and the pass counts of each rule over all candidates and over
    the kept ones (what selection bought)."""
    from ctxdistill.core.checks import compile_checks, grounded_test, select_score
    from ctxdistill.inputs import context_text

    n, rules = cfg.teach.samples, cfg.teach.select
    context = context_text(cfg)
    checks = compile_checks(cfg.task.checks) if "checks" in rules else []
    tests = [(c.name, c.test) for c in checks] + ([("grounded", grounded_test(context))] if "grounded" in rules else [])
    best: dict[tuple[int, int], tuple[tuple, Answer]] = {}
    before = Counter()
    for a in kept:
        x = rows[a.row]["input"]
        before.update(name for name, t in tests if t(a.answer, x))
        key = (a.row, a.sample // n)
        score = (*select_score(a.answer, x, checks, context, rules), -a.sample)
        if key not in best or score > best[key][0]:
            best[key] = (score, a)
    chosen = [dataclasses.replace(a, sample=a.sample // n, candidate=a.sample) for _, a in
              (best[k] for k in sorted(best))]
    after = Counter(name for a in chosen for name, t in tests if t(a.answer, rows[a.row]["input"]))
    return chosen, {"candidates": len(kept), "kept": len(chosen),
                    "passed_before": {name: before[name] for name, _ in tests},
                    "passed_after": {name: after[name] for name, _ in tests}}


@dataclasses.dataclass
class Answer:
    """One sampled teacher answer, extracted and aligned (steps 1-2)."""
    row: int                 # index of its input in the rows passed in
    sample: int              # sample number for that input
    seq: list[int]           # teacher scoring sequence: [teacher chat prompt, prefix of y before a, a]
    answer_ids: list[int]    # a's token ids, the same after the student prompt (checked)
    answer: str
    text: str                # the assistant text: prefill + completion
    finished: bool           # the terminator follows a (False only for a cut completion kept by keep_unfinished)
    recorded: Labels | None  # soft labels recorded while sampling, at a's positions, when they apply
    candidate: int | None = None  # with teach.samples > 1: which of the drawn candidates this is


def sample_answers(model, tok, cfg: Config, rows: list[dict], prompts: list[list[int]],
                   student_prompts: list[list[int]], *, win: int, prefix: PrefixCache | None,
                   seed: int, candidates: int = 1, temperature: float | None = None) -> tuple[list[Answer], Counter]:
    """Steps 1-2: sample y for each (input, sample), extract a = f(y) and align it to token ids shared by
    teacher and student. Returns the kept answers and the drop counts (by reason). Also used by the
    fidelity evaluation, on held-out inputs, so that it scores the same kind of answers training saw."""
    t_tpl, s_tpl = teacher_template(cfg.task), student_template(cfg.task)
    n_samples, eos, pad = cfg.generation.samples_per_input, models.stop_ids(tok), tok.pad_token_id
    drops: Counter = Counter()
    keep_cut = cfg.task.extractor.kind == "whole" and cfg.task.extractor.keep_unfinished

    # 1. Sample y for every (input, sample) pair; with `candidates` = N, N draws for each (teach.samples). A
    # row with a "target" (a self-study recitation: the passage itself) is not sampled: the target is its one
    # answer, and the teacher only scores it (soft labels by the rescoring pass below).
    temperature = cfg.generation.temperature if temperature is None else temperature
    if temperature == 0:
        n_samples = 1  # greedy: one answer per input
    jobs = [(i, s) for i in range(len(rows)) for s in range(1 if "target" in rows[i] else n_samples * candidates)]
    sampled = [(i, s) for i, s in jobs if "target" not in rows[i]]
    drawn = iter(generate(model, [prompts[i] for i, _ in sampled], pad_id=pad, eos_id=eos,
                          max_new_tokens=cfg.generation.max_new_tokens, temperature=temperature,
                          batch_size=cfg.teach.batch_size, seed=seed, desc="teacher: sample", prefix=prefix,
                          keep_topk=cfg.teach.top_k, seeds=[example_seed(seed, rows[i]["id"], s) for i, s in sampled]))
    completions = [(encode(tok, rows[i]["target"]), True, None) if "target" in rows[i] else next(drawn)
                   for i, _ in jobs]

    # 2. a = f(y), aligned to token ids shared by teacher and student.
    kept = []
    for (i, s), (new_ids, finished, recorded) in zip(jobs, completions):
        t_prefill = t_tpl.prefill.format(input=rows[i]["teacher_input"])
        text = t_prefill + tok.decode(new_ids, skip_special_tokens=False)
        if cfg.task.extractor.kind == "whole" and not finished and not keep_cut:
            drops["unfinished (no terminator within max_new_tokens)"] += 1
            continue
        span = extract(cfg.task.extractor, text)
        if span is None:
            drops[EXTRACT_FAILED] += 1
            continue
        aligned = align_answer(tok, text[:span[0]], text[span[0]:span[1]])
        if aligned is None:
            drops["answer has no clean token boundary"] += 1
            continue
        pre, answer, answer_ids = aligned
        # The student emits the same ids after its own prompt (and prefill): check, don't assume.
        s_prefill = s_tpl.prefill.format(input=rows[i]["student_input"])
        if encode(tok, s_prefill + answer) != encode(tok, s_prefill) + answer_ids:
            drops["answer tokens differ between teacher and student"] += 1
            continue
        chat = prompts[i][:len(prompts[i]) - len(encode(tok, t_prefill))]
        seq = chat + encode(tok, pre) + answer_ids
        if len(seq) > win or len(student_prompts[i]) + len(answer_ids) + 1 > win:
            drops["answer does not fit the window"] += 1
            continue
        # The labels recorded while sampling apply when seq is exactly [prompt, first generated tokens].
        start = len(seq) - len(answer_ids) - len(prompts[i])  # index of the first answer token in new_ids
        if recorded is not None and start >= 0 and prompts[i] + new_ids[:len(seq) - len(prompts[i])] == seq:
            recorded = Labels(*(t[start:start + len(answer_ids)] for t in recorded))
        else:
            recorded = None
        # A cut completion kept whole (keep_unfinished) has no terminator to learn; any other answer ends with one.
        kept.append(Answer(i, s, seq, answer_ids, answer, text, finished or not keep_cut, recorded))
    return kept, drops


def averaged_labels(cfgs: list[Config], candidates: list[tuple[dict, list[Example]]]) -> list[Example]:
    """Soft labels averaged over several teacher prompts (simultaneous distillation beyond the window).

    `cfgs` differ only in their teacher context (e.g. each holds another subset of the examples).
    `candidates` pairs each input row with the answers the teachers sampled for it (one Example per
    teacher that kept one). Every teacher prompt scores every distinct candidate after the same completion
    prefix; the per-token distributions are averaged in probability space over the prompts. Per row, the
    candidate the averaged teacher finds most likely (sum of log-probs of its tokens) is kept, with the
    top-k + tail of the average as its labels: the ensemble's answer, not one teacher's.
    """
    from ctxdistill.core.sampling import answer_positions, logits_at, right_pad, topk_with_tail

    cfg0 = cfgs[0]
    tok = models.load_tokenizer(cfg0.model.name)
    model = models.load_model(cfg0.model)
    win = models.window(model, cfg0.model)
    pairs = []  # (row index, row, example, tokens between the chat prompt and the answer)
    for r, (row, exs) in enumerate(candidates):
        seen = set()
        for ex in exs:
            text = ex.meta["completion"]
            span = extract(cfg0.task.extractor, text)
            aligned = span and align_answer(tok, text[:span[0]], text[span[0]:span[1]])
            if not aligned or aligned[2] != ex.answer_ids:
                raise UserError(f"{ex.id}: the stored answer no longer aligns with its completion; re-run the teacher pass")
            pre = encode(tok, aligned[0])
            if (tuple(pre), tuple(ex.answer_ids)) not in seen:
                seen.add((tuple(pre), tuple(ex.answer_ids)))
                pairs.append((r, row, ex, pre))
    seqs, chats = [], []  # per teacher: the scoring sequences, and their chat parts (the prompt less its prefill)
    for cfg in cfgs:
        t_tpl = teacher_template(cfg.task)
        per, per_chat = [], []
        for _, row, ex, pre in pairs:
            fitted = dict(row)
            t_ids, _, _ = fit_prompts(cfg, tok, fitted, win)  # records the input as used (cut to fit the window)
            chat = t_ids[:len(t_ids) - len(encode(tok, t_tpl.prefill.format(input=fitted["teacher_input"])))]
            per.append(chat + pre + ex.answer_ids)
            per_chat.append(chat)
        seqs.append(per)
        chats.append(per_chat)
    # Each teacher's context encoded once. The shared prefix is taken from the chat parts, never the scoring
    # sequences: two candidates of one input may share their first answer tokens, and a prefix reaching into
    # the answers would leave their first positions outside the rows scored.
    prefixes = [prefix_for(model, c) for c in chats]
    best: dict[int, tuple[float, Example]] = {}
    bs = cfg0.teach.batch_size
    with torch.no_grad(), bar("teacher: average", len(pairs)) as advance:
        for b in range(0, len(pairs), bs):
            lens = [len(ex.answer_ids) for _, _, ex, _ in pairs[b:b + bs]]
            total = None
            for per, prefix in zip(seqs, prefixes):
                p_len = len(prefix) if prefix is not None else 0
                chunk = [s[p_len:] for s in per[b:b + bs]]
                ids, mask = right_pad(chunk, tok.pad_token_id)
                rows, cols = answer_positions([len(q) for q in chunk], lens)
                probs = torch.softmax(logits_at(model, ids, mask, rows, cols, prefix=prefix), -1)
                total = probs if total is None else total + probs
            logp = (total / len(cfgs)).clamp_min(1e-30).log()
            top_ids, top_lp, tail = topk_with_tail(logp, cfg0.teach.top_k)
            targets = torch.tensor([t for _, _, ex, _ in pairs[b:b + bs] for t in ex.answer_ids], device=logp.device)
            own = logp.gather(-1, targets[:, None])[:, 0]
            start = 0
            for (r, _, ex, _), a in zip(pairs[b:b + bs], lens):
                sl = slice(start, start + a)
                score = float(own[sl].sum())
                if r not in best or score > best[r][0]:
                    best[r] = (score, dataclasses.replace(
                        ex, topk_ids=top_ids[sl].cpu().clone(), topk_logprobs=top_lp[sl].cpu().clone(),
                        tail_logmass=tail[sl].cpu().clone(),
                        meta={**ex.meta, "labels": f"averaged over {len(cfgs)} teachers",
                              "candidates": sum(p[0] == r for p in pairs), "ensemble_logp": round(score, 4)}))
                start += a
            advance(len(lens))
    return [best[r][1] for r in sorted(best)]
