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
import math
import shutil
from collections import Counter

import torch

from ctxdistill.core import distributed, models
from ctxdistill.config import Config
from ctxdistill.core.errors import UserError
from ctxdistill.core.extract import extract
from ctxdistill.core.progress import bar, log
from ctxdistill.core.sampling import Labels, PrefixCache, prefix_for, score_answers
from ctxdistill.answers import EXTRACT_FAILED, Answer, align_answer, sample_answers
from ctxdistill.prompts import context_group, fit_prompts, row_temperature
from ctxdistill.store import Example, ShardedStore, load_split, store_hashes
from ctxdistill.core.templates import encode, teacher_template


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
        labels = next(scored) if a.recorded is None else Labels(*(t.clone() for t in a.recorded))
        top_ids, top_lp, tail = labels.top_ids, labels.top_logprobs, labels.tail_logmass
        p = labels.chosen_logprob.exp()
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
    from ctxdistill.prompts import context_text

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
