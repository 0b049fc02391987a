"""Before a bake: does the teacher know the prompt's facts, and under which settings does it state them?

    python benchmarks/teacher_probe.py PROMPT.txt FACTS.jsonl [--model embedded] [--out FILE]

A student cannot learn a fact its teacher does not state, so this measures the teacher before any training
(DESIGN.md §7's pre-checks, on the bake's own pieces: selfstudy's passages and detail questions, the facts
file's span match, the teacher pass's selection rule):

1. fact recall on the closed-book questions (FACTS.jsonl): base greedy, teacher greedy, teacher sampled at
   temperature 1.0 and 0.7 (4 samples each), and each question's greedy result;
2. the rule-built detail questions (selfstudy.detail_items, 48 at most, shuffled with seed 0): does the
   teacher's reply state the specific the question asks for, and is every specific it states grounded in the
   context (core/specifics.py)? With the whole prompt, and with the opening passage + the question's passage
   (teach.context = 'passage'); greedy, and at 0.7 the first of 4 samples, the one the selection rule keeps
   (grounded first) and whether any of the 4 states it.
"""

from __future__ import annotations

import random
from pathlib import Path

from _common import parser, timed, write_result


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("prompt", help="the system prompt (a text file)")
    ap.add_argument("facts", help="closed-book questions, JSONL {input, answer}")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    from ctxdistill import selfstudy
    from ctxdistill.config import ModelConfig
    from ctxdistill.core import models
    from ctxdistill.core.checks import select_score
    from ctxdistill.core.metrics import span_match
    from ctxdistill.core.sampling import generate, prefix_for
    from ctxdistill.core.specifics import ungrounded
    from ctxdistill.core.templates import Template
    from ctxdistill.inputs import read_facts

    ctx = Path(args.prompt).read_text(encoding="utf-8").strip()
    facts = read_facts(Path(args.facts))
    tok = models.load_tokenizer(args.model)
    model = models.load_model(ModelConfig(name=args.model))

    def replies(systems: list[str], questions: list[str], temperature: float = 0.0, n: int = 1) -> list[str]:
        lit = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731  literal text in a template
        prompts = [Template(user="{input}", system=lit(s)).render(tok, q)[0]
                   for s, q in zip(systems, questions) for _ in range(n)]
        outs = generate(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        max_new_tokens=args.max_new_tokens, temperature=temperature, batch_size=16, seed=0,
                        prefix=prefix_for(model, prompts), seeds=list(range(len(prompts))) if temperature else None)
        return [tok.decode(o[0], skip_special_tokens=True) for o in outs]

    res: dict = {"model": args.model, "prompt": args.prompt, "facts_file": args.facts, "n_questions": len(facts),
                 "n_facts": len({f["fact"] for f in facts}), "fact_recall": {}, "detail": {}}
    questions = [f["input"] for f in facts]
    for name, system, t, n in (("base greedy", "", 0.0, 1), ("teacher greedy", ctx, 0.0, 1),
                               ("teacher T=1.0 x4", ctx, 1.0, 4), ("teacher T=0.7 x4", ctx, 0.7, 4)):
        with timed() as tm:
            texts = replies([system] * len(facts), questions, t, n)
        hits = [span_match(x, facts[i // n]["answer"]) for i, x in enumerate(texts)]
        res["fact_recall"][name] = {"recall": round(sum(hits) / len(hits), 4), "right": int(sum(hits)),
                                    "of": len(hits), "seconds": round(tm.seconds, 1)}
        print(f"fact recall, {name}: {sum(hits) / len(hits):.1%} ({int(sum(hits))}/{len(hits)})", flush=True)
        if name == "teacher greedy":
            res["teacher_greedy_per_question"] = [
                {"input": f["input"], "fact": f["fact"], "right": bool(h), "reply": x} for f, h, x in zip(facts, hits, texts)]

    passages = selfstudy.split_passages(ctx)
    items = [(q, a, p.index) for p in passages for q, a in selfstudy.detail_items(p, p.common)]
    random.Random(0).shuffle(items)
    items = items[:48]
    qs = [q for q, _, _ in items]
    ans = [a for _, a, _ in items]
    opening = passages[0].text
    for name, systems in (("whole prompt", [ctx] * len(items)),
                          ("opening + passage", [opening + "\n\n" + passages[i].text for _, _, i in items])):
        texts = replies(systems, qs)
        states = [span_match(x, [a]) for x, a in zip(texts, ans)]
        grounded = [not ungrounded(x, [ctx, q]) for x, q in zip(texts, qs)]
        row = {"greedy_states_specific": round(sum(states) / len(items), 4),
               "greedy_grounded": round(sum(grounded) / len(items), 4)}
        texts = replies(systems, qs, 0.7, 4)
        first = kept = anyof = 0
        for j, (q, a) in enumerate(zip(qs, ans)):
            cands = texts[4 * j:4 * j + 4]
            best = max(range(4), key=lambda k: (*select_score(cands[k], q, [], ctx, ["grounded"]), -k))
            first += span_match(cands[0], [a])
            kept += span_match(cands[best], [a])
            anyof += any(span_match(c, [a]) for c in cands)
        row.update({"t0.7_first_states": round(first / len(items), 4), "t0.7_kept_states": round(kept / len(items), 4),
                    "t0.7_any_of_4_states": round(anyof / len(items), 4)})
        res["detail"][name] = row
        print(f"detail questions ({len(items)}), {name}: {row}", flush=True)
    res["n_detail_questions"] = len(items)
    write_result(res, args.out)


if __name__ == "__main__":
    main()
