"""Reference-free fidelity: how closely the model without the context behaves like the model with it.

Measured on held-out inputs the student never trained on, with no reference answers:

  teacher-forced divergence   the teacher (the initial model with the context) samples answers exactly as
                              in the teacher pass (same temperature, extractor f and token alignment); at
                              every answer token t, KL(p_teacher(. | context, x, a<t) || p_m(. | x, a<t)) over
                              the full vocabulary, for m = the base model and the student, both without the
                              context. Reported as the mean per answer token, and as the fraction of the
                              gap closed, 1 - KL_student / KL_base (what prompt-baking work reports).
  agreement                   greedy outputs of base and student against the teacher's greedy output (f
                              applied): normalised exact match and ROUGE-L (computed in evaluate.py).
  cost                        prompt tokens per request with and without the context, and the latency of
                              the prompt's forward pass at batch size 1 (the time to the first token when
                              no prompt cache is kept), median over a few held-out inputs.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ctxdistill.core import models
from ctxdistill.answers import sample_answers
from ctxdistill.config import Config
from ctxdistill.core.progress import bar
from ctxdistill.core.sampling import answer_positions, logits_at, prefix_for, right_pad
from ctxdistill.prompts import fit_prompts

LATENCY_INPUTS = 8  # held-out inputs timed per system


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the full vocabulary, from logits [N, V] (any float dtype, fp32 math): [N].

    sum_v p_v (log p_v - log q_v); a token p gives probability 0 adds 0, even where p's logit is -inf (a masked
    vocabulary: there log p - log q is -inf, and 0 * -inf would be NaN).
    """
    lp, lq = F.log_softmax(p_logits.float(), dim=-1), F.log_softmax(q_logits.float(), dim=-1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def answer_logits(model, seqs: list[list[int]], answer_lens: list[int], pad_id: int, prefix=None) -> torch.Tensor:
    """fp32 logits predicting the last answer_lens[i] tokens of each sequence: [sum(answer_lens), V]."""
    p_len = len(prefix) if prefix is not None else 0
    own = [s[p_len:] for s in seqs]
    ids, mask = right_pad(own, pad_id)
    rows, cols = answer_positions([len(q) for q in own], answer_lens)
    return logits_at(model, ids, mask, rows, cols, prefix=prefix)


def teacher_forced_kl(cfg: Config, tok, base, student, rows: list[dict]) -> dict:
    """The teacher samples answers for `rows` (held-out inputs); the mean per-token KL from the teacher to the
    base model and to the student on them, and the fraction of the gap closed. `base` is the initial model
    (which, given the teacher template, is the teacher)."""
    win = models.window(base, cfg.model)
    rows = [dict(r) for r in rows]  # fit_prompts records the inputs as used
    t_prompts, s_prompts = zip(*[fit_prompts(cfg, tok, r, win)[:2] for r in rows]) if rows else ((), ())
    t_prompts, s_prompts = list(t_prompts), list(s_prompts)
    t_prefix = prefix_for(base, t_prompts)  # the context, encoded once
    kept, drops = sample_answers(base, tok, cfg, rows, t_prompts, s_prompts, win=win, prefix=t_prefix,
                                 seed=cfg.teach.seed)
    total = {"base": 0.0, "student": 0.0}
    per_answer = {"base": [], "student": []}  # KL summed over each answer's tokens, for intervals
    n_tokens = 0
    s_seqs = [s_prompts[a.row] + a.answer_ids for a in kept]
    with torch.no_grad():
        # The shared prefix is taken from the prompts, so it never reaches into an answer.
        shared = [s_prompts[a.row] for a in kept]
        prefixes = {"base": prefix_for(base, shared), "student": prefix_for(student, shared)}
        bs = cfg.eval.batch_size
        with bar("eval: fidelity (teacher-forced KL)", len(kept)) as advance:
            for b in range(0, len(kept), bs):
                chunk, lens = kept[b:b + bs], [len(a.answer_ids) for a in kept[b:b + bs]]
                teacher = answer_logits(base, [a.seq for a in chunk], lens, tok.pad_token_id, t_prefix)
                for name, model in (("base", base), ("student", student)):
                    q = answer_logits(model, s_seqs[b:b + bs], lens, tok.pad_token_id, prefixes[name])
                    kl = token_kl(teacher, q.to(teacher.device))
                    total[name] += float(kl.sum())
                    per_answer[name] += [float(x.sum()) for x in kl.split(lens)]
                n_tokens += sum(lens)
                advance(len(chunk))
    kl = {k: v / max(n_tokens, 1) for k, v in total.items()}
    return {"n_inputs": len(rows), "n_answers": len(kept), "answer_tokens": n_tokens, "dropped": dict(drops),
            "temperature": cfg.generation.temperature, "kl": {k: round(v, 4) for k, v in kl.items()},
            "kl_gap_closed": round(1 - kl["student"] / kl["base"], 4) if kl["base"] > 0 else None,
            # (KL base, KL student, tokens) per answer: evaluate.intervals resamples them, then drops them
            "per_answer": [(b, st, len(a.answer_ids)) for b, st, a in zip(per_answer["base"], per_answer["student"], kept)]}


def prompt_latency_ms(model, prompts: list[list[int]]) -> float:
    """Median wall time of one forward pass over each prompt at batch size 1 (the first token's logits only,
    as `generate` computes them), over the first LATENCY_INPUTS prompts, after one untimed warm-up."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    times = []
    with torch.inference_mode():
        for i, ids in enumerate([prompts[0]] + prompts[:LATENCY_INPUTS]):
            x = torch.tensor([ids], device=lm.device)
            t0 = time.perf_counter()
            lm(input_ids=x, use_cache=False, logits_to_keep=1)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            if i:  # the first pass warms up kernels and allocations
                times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def cost(base, prompt_ids: dict[str, list[list[int]]]) -> dict:
    """Prompt tokens per request and prompt latency for the teacher's prompts (with the context) and the
    student's (without), both timed on the same weights (`base`: a merged student costs the same)."""
    tokens = {k: sum(map(len, v)) / len(v) for k, v in prompt_ids.items()}
    ms = {k: prompt_latency_ms(base, v) for k, v in prompt_ids.items()}
    return {"prompt_tokens": {k: round(v, 1) for k, v in tokens.items()},
            "prompt_token_ratio": round(tokens["teacher"] / tokens["student"], 2),
            "latency_ms": {k: round(v, 2) for k, v in ms.items()},
            "latency_saved_ms": round(ms["teacher"] - ms["student"], 2),
            "latency_ratio": round(ms["teacher"] / ms["student"], 2),
            "latency_inputs": min(LATENCY_INPUTS, len(next(iter(prompt_ids.values()))))}
