"""Where a bake's time goes: wall time, tokens/s and wasted work per stage, and (with --ops) each stage's
time in matrix multiplies, attention, other tensor ops and the Python around them.

    python benchmarks/bake_profile.py [--recipe recipes/bake_system_prompt.toml] [--n-inputs 128]
        [--n-eval 16] [--n-facts 16] [--ops] [--set SECTION.FIELD=VALUE ...] [--out docs/bench/bake_profile.json]

Runs the recipe's bake (its prompt and settings; fewer inputs, held-out messages and fact questions so that
it takes minutes: the stages' shares hold, the absolute times scale with the counts) stage by stage, as
`ctxdistill run` does: inputs -> teach -> train -> export -> eval. For each stage it reports:
- wall seconds, and the tokens the stage exists to produce or process per second (inputs: tokens of the
  kept messages; teach: tokens of the kept answers; train: tokens the loss covers; eval: tokens of the
  greedy replies of base, teacher and student);
- the work thrown away: synthesis' generations rejected (cut at max_new_tokens, empty, duplicates), the
  teacher's candidates not kept by selection (teach.samples), training's padding tokens;
- with --ops, a second run of the same bake under torch.profiler (CPU): the self time of matrix-multiply
  ops (mm, addmm, bmm, linear), of attention (scaled_dot_product_attention), of every other tensor op,
  and the rest of the wall time (Python, Hugging Face module code, the profiler's own cost), as shares of
  the stage. The profiled run is slower than the timed one; the timed run's seconds are the ones to quote.
Each run bakes into a fresh temporary directory; nothing else may share the cores while it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from _common import parser, timed, write_result

os.environ.setdefault("CTXDISTILL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
          "aten::_addmm_activation", "mkldnn::", "aten::mkldnn_")
ATTENTION = ("scaled_dot_product", "flash_attention")


def op_class(name: str) -> str:
    """'matmul', 'attention' or 'other ops' for a profiler event name."""
    if any(name.startswith(m) for m in MATMUL):
        return "matmul"
    if any(a in name for a in ATTENTION):
        return "attention"
    return "other ops"


def op_shares(prof, wall: float) -> dict:
    """Seconds and shares of the stage's wall time by op class, from the profiler's self times (on the
    calling thread: an op parallelised over cores counts its wall time once); the rest is Python."""
    by = Counter()
    for e in prof.key_averages():
        by[op_class(e.key)] += e.self_cpu_time_total / 1e6
    secs = {k: round(by[k], 2) for k in ("matmul", "attention", "other ops")}
    secs["python and the rest"] = round(max(wall - sum(by.values()), 0.0), 2)
    return {"seconds": secs, "share": {k: round(v / wall, 3) for k, v in secs.items()}, "wall_profiled": round(wall, 1)}


def stage_fns():
    from ctxdistill.evaluate import evaluate
    from ctxdistill.export import export_model
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.teach import teach
    from ctxdistill.train import train

    return {"inputs": prepare_inputs, "teach": teach, "train": train, "export": export_model, "eval": evaluate}


def work_counts(cfg, tok) -> dict:
    """Per stage: the useful tokens it produced or processed, and the work it threw away, read back from the
    files the stage wrote."""
    out = cfg.out

    def ntok(texts) -> int:
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    rows = [json.loads(x) for x in open(out / "inputs" / "train.jsonl")] + \
           [json.loads(x) for x in open(out / "inputs" / "eval.jsonl")]
    synth = json.loads((out / "inputs" / "stats.json").read_text()).get("synth", {})
    rejected = sum((synth.get("rejected") or {}).values()) + synth.get("duplicates", 0)
    model_written = synth.get("generated", 0)
    inputs = {"tokens": ntok(r["input"] for r in rows), "generations": model_written,
              "rule_built": synth.get("rule_built", 0), "rejected_generations": rejected,
              "rejected_detail": {**(synth.get("rejected") or {}), "duplicates": synth.get("duplicates", 0)}}

    answers = [json.loads(x)["answer"] for f in sorted((out / "teacher").glob("shard-*.jsonl")) for x in open(f)]
    sel = json.loads((out / "teacher" / "manifest.json").read_text()).get("selection") or {}
    teach = {"tokens": ntok(answers), "answers": len(answers), "candidates": sel.get("candidates", len(answers)),
             "candidates_not_kept": sel.get("candidates", len(answers)) - sel.get("kept", len(answers))}

    log = [json.loads(x) for x in open(out / "student" / "train_log.jsonl")]
    train = {"tokens": sum(r.get("tokens", 0) for r in log), "steps": len(log),
             "computed_tokens": sum(r.get("computed_tokens", 0) for r in log),
             "pad_tokens": sum(r.get("pad_tokens", 0) for r in log)}

    preds = [json.loads(x) for x in open(out / "eval" / "predictions.jsonl")]
    facts = out / "eval" / "facts.jsonl"
    preds += [json.loads(x) for x in open(facts)] if facts.is_file() else []
    replies = [v.get("prediction", v.get("reply")) for p in preds for v in p.values()
               if isinstance(v, dict) and ("prediction" in v or "reply" in v)]  # held-out rows, fact rows
    ev = {"tokens": ntok(replies), "replies": len(replies)}
    return {"inputs": inputs, "teach": teach, "train": train, "eval": ev}


def bake_once(cfg, profile: bool) -> dict:
    """Run the stages in order into cfg.out; per stage the wall seconds (and op shares when profiling)."""
    import torch

    res = {}
    for name, fn in stage_fns().items():
        if name == "export" and not cfg.export.merge:
            continue
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile \
            else contextlib.nullcontext()
        with prof, timed() as t:
            fn(cfg)
        res[name] = {"seconds": round(t.seconds, 1)}
        if profile:
            res[name]["ops"] = op_shares(prof, t.seconds)
    return res


def small_config(recipe: Path, out: Path, n_inputs: int, n_eval: int, n_facts: int, sets: list[str]):
    """The recipe's config with fewer inputs, held-out messages and fact questions (the first of each file)."""
    import tomllib

    from ctxdistill.baking import parse_override, set_field
    from ctxdistill.config import config_from_dict

    raw = tomllib.loads(recipe.read_text())
    raw["out_dir"] = str(out)
    data = raw.setdefault("data", {})
    data.setdefault("synth", {})["n"] = n_inputs
    out.mkdir(parents=True, exist_ok=True)
    for key, n in (("eval", n_eval), ("facts", n_facts)):
        if data.get(key):
            src = recipe.parent / data[key]
            dest = out.parent / f"{out.name}.{key}{src.suffix}"
            dest.write_text("\n".join([x for x in src.read_text().splitlines() if x.strip()][:n]) + "\n")
            data[key] = str(dest)
    for item in sets:
        set_field(raw, *parse_override(item))
    return config_from_dict(raw, base_dir=recipe.parent)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "bake_system_prompt.toml"))
    ap.add_argument("--n-inputs", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--n-facts", type=int, default=16)
    ap.add_argument("--ops", action="store_true", help="a second, profiled run: time by op class per stage")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args()

    import torch

    from ctxdistill.core.models import load_tokenizer

    res = {"recipe": os.path.relpath(args.recipe, ROOT), "n_inputs": args.n_inputs, "n_eval": args.n_eval,
           "n_facts": args.n_facts, "set": args.set, "threads": torch.get_num_threads(), "stages": {}}
    with tempfile.TemporaryDirectory() as d:
        cfg = small_config(Path(args.recipe), Path(d) / "timed", args.n_inputs, args.n_eval, args.n_facts, args.set)
        timed_run = bake_once(cfg, profile=False)
        counts = work_counts(cfg, load_tokenizer(cfg.model.name))
        for name, r in timed_run.items():
            c = counts.get(name, {})
            res["stages"][name] = {**r, **c, **({"tokens_per_s": round(c["tokens"] / r["seconds"], 1)}
                                              if c.get("tokens") and r["seconds"] else {})}
        res["total_seconds"] = round(sum(r["seconds"] for r in timed_run.values()), 1)
        res["stage_share"] = {k: round(r["seconds"] / res["total_seconds"], 3) for k, r in timed_run.items()}
        if args.ops:
            cfg = small_config(Path(args.recipe), Path(d) / "profiled", args.n_inputs, args.n_eval, args.n_facts,
                               args.set)
            for name, r in bake_once(cfg, profile=True).items():
                res["stages"][name]["ops"] = r["ops"]
    write_result(res, args.out, echo=True)


if __name__ == "__main__":
    main()
