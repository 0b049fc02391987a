"""The `ctxdistill` command: one thin subcommand per library function.

    ctxdistill inputs CONFIG      -> inputs.prepare_inputs
    ctxdistill teach CONFIG       -> teach.teach
    ctxdistill train CONFIG       -> train.train; with --sft/--sft-teacher FILE -> baseline.sft_model_from_config
    ctxdistill eval CONFIG        -> pipeline.evaluate_and_card (evaluate.evaluate; with export.merge, export first)
                                     (teach, train and eval run inputs.prepare_inputs first: it reuses what is there)
    ctxdistill run CONFIG         -> pipeline.run (all of the above); a [compose] file -> compose.run_composition;
                                     an [experiment] recipe -> the ctxdistill.recipes entry point's run
                                     (ctxdistill.experiments: the paper's experiments)
    ctxdistill baseline sft CONFIG --examples FILE -> baseline.sft_from_config
    ctxdistill bake --system-prompt FILE -> baking.bake_config, baking.claim_out, pipeline.run
    ctxdistill compare OUT INPUT  -> evaluate.compare
    ctxdistill export OUT         -> gguf_export.export_gguf (--format gguf), export.export_model (--format hf)
    ctxdistill demo               -> pipeline.run(demo.demo_config())

User mistakes print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import shlex
import sys
from pathlib import Path

from ctxdistill.config import DTYPES, GGUF_TYPES
from ctxdistill.core import errors
from ctxdistill.core.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctxdistill", description="Context distillation: bake a context into a model's weights.")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"inputs": "load and split the task inputs", "teach": "teacher pass: sample, extract, store soft labels",
             "train": "train the student on the distillation set", "eval": "score base, teacher and student",
             "run": "all stages in order"}
    for name, h in helps.items():
        s = sub.add_parser(name, help=h, description=h)
        s.add_argument("config", help="task config (TOML)")
        s.add_argument("--out", help="override out_dir")
        if name in ("teach", "train", "run"):
            s.add_argument("--overwrite", action="store_true", help="replace existing artefacts instead of reusing them")
            s.add_argument("--num-processes", type=int, default=0, metavar="N",
                           help="run this command as N processes (data parallel) through `accelerate launch`; the "
                                "same as `accelerate launch --multi_gpu --num_processes N -m ctxdistill ...`")
        if name == "run":
            s.add_argument("--quick", action="store_true",
                           help="experiment recipes: the fast test-scale variant (2 tasks, 8 train / 4 eval inputs, 1 epoch)")
        if name == "train":
            s.add_argument("--sft", metavar="FILE", help="instead of distilling: fine-tune on labelled examples "
                           "(JSONL, {'input', 'reference'}) under the student template, into <out>/sft/ (full weights)")
            s.add_argument("--sft-teacher", metavar="FILE", help="the same under the teacher template (with --sft: "
                           "both sets shuffled together, multitask); e.g. scratchpad data to prepare a teacher")
        if name in ("train", "run"):
            s.add_argument("--mode", choices=["offline", "on-policy"],
                           help="override train.mode: offline (default: learn the stored teacher answers) or "
                                "on-policy (the student samples, the frozen teacher with context scores)")
    b = sub.add_parser("baseline", help="direct gradient descent on labelled examples (the paper's baseline)",
                       description="sft: fine-tune the student template on the labelled examples, evaluate every epoch")
    b.add_argument("kind", choices=["sft"])
    b.add_argument("config", help="task config (TOML): model, student template, train settings, eval split")
    b.add_argument("--examples", required=True, help="JSONL of labelled examples, {'input', 'reference'} per line")
    b.add_argument("--epochs", type=int, default=25, help="epochs, each evaluated (default 25, as in the paper)")
    b.add_argument("--batch-size", type=int, default=0, help="examples per step; 0 = all in one batch (default)")
    b.add_argument("--out", help="override out_dir")
    k = sub.add_parser("bake", help="bake a system prompt or few-shot turns into the model; no labels needed",
                       description="From a model and a context to the same model without it: synthesise inputs, "
                       "teach, train, merge, and score fidelity on held-out inputs (baking.py). Every config field "
                       "can be set with --set; the run is written as <out>/config.toml.")
    k.add_argument("--model", default="embedded", help="Hugging Face id, local model directory, or 'embedded' (default)")
    k.add_argument("--system-prompt", metavar="FILE", help="UTF-8 text file: the system prompt to bake in (literal text)")
    k.add_argument("--shots", metavar="FILE", help="JSONL of few-shot turns to bake in, {'user': ..., 'assistant': ...} per line")
    k.add_argument("--seeds", metavar="FILE", help="example user messages, one per line (or JSONL {'input'}), for "
                   "few-shot input synthesis; without it, self-study: questions and restatements of each passage of the "
                   "context, and messages the model writes behind it")
    k.add_argument("--eval", metavar="FILE", help="held-out user messages to evaluate on, one per line (or JSONL "
                   "{'input'}); default: data.n_eval of the synthesised ones, never trained on")
    k.add_argument("--facts", metavar="FILE", help="closed-book fact questions to score, JSONL {'input': question, "
                   "'answer': accepted string or list}; reported as fact recall, never trained on")
    k.add_argument("--out", default="runs/bake", help="output directory (default runs/bake)")
    k.add_argument("--check", action="append", default=[], metavar="REGEX",
                   help="a rule check: the reply matches REGEX (re.search); repeatable")
    k.add_argument("--check-python", action="append", default=[], metavar="EXPR",
                   help="a rule check: a Python expression of `reply` and `input` (json, re in scope); repeatable")
    k.add_argument("--n-inputs", type=int, metavar="N", help="training inputs to synthesise (data.synth.n, default 512)")
    k.add_argument("--n-eval", type=int, metavar="N", help="held-out inputs (data.n_eval, default 48)")
    k.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set train.lr=1e-4 --set train.method=\"full\"; repeatable")
    m = k.add_mutually_exclusive_group()
    m.add_argument("--merge", dest="merge", action="store_true", default=True,
                   help="write <out>/model/: a standalone model (LoRA merged) with a model card (the default)")
    m.add_argument("--no-merge", dest="merge", action="store_false", help="keep only the student (an adapter for LoRA)")
    k.add_argument("--gguf", nargs="?", const="f16", choices=GGUF_TYPES, metavar="TYPE",
                   help="also write <out>/model/<out name>-<TYPE>.gguf and an Ollama Modelfile, for llama.cpp, Ollama "
                   "and LM Studio (export.gguf): f16 (the default TYPE) or q8_0; Llama-architecture models only")
    k.add_argument("--dtype", choices=["auto", *DTYPES], help="dtype of <out>/model/'s weights (export.dtype; default "
                   "auto: the base model's own, bfloat16 for the embedded model)")
    k.add_argument("--config", metavar="FILE", help="write the equivalent config to FILE and stop; `ctxdistill run "
                   "FILE` then runs this bake")
    k.add_argument("--overwrite", action="store_true", help="replace the bake already in --out")
    c = sub.add_parser("compare", help="base, teacher (with context) and student (without) side by side",
                       description="Greedy replies of the base model (no context), the teacher (with context) and the "
                       "student (no context) to the same inputs, for checking a bake by eye.")
    c.add_argument("target", help="a run's output directory (holding config.toml, as a bake writes) or its config file")
    c.add_argument("inputs", nargs="*", help="user messages")
    c.add_argument("--file", help="more user messages, one per line")
    e = sub.add_parser("export", help="write a baked model as GGUF (llama.cpp, Ollama) or re-export it as Hugging Face",
                       description="--format gguf (default): convert OUT/model/ (or OUT itself, a Hugging Face model "
                       "directory) to OUT/model/<name>-<TYPE>.gguf with an Ollama Modelfile beside it, and list it in "
                       "the model card. Llama-architecture models only. --format hf: write OUT/model/ again from the "
                       "bake's student (a LoRA adapter merged) in --dtype.")
    e.add_argument("target", help="a bake's output directory (holding model/), or a Hugging Face model directory")
    e.add_argument("--format", choices=["gguf", "hf"], default="gguf", help="gguf (default) or hf")
    e.add_argument("--quant", choices=GGUF_TYPES, help="GGUF tensor type: f16 (default) or q8_0")
    e.add_argument("--dtype", choices=["auto", *DTYPES], help="with --format hf: the weights' dtype (default auto: the "
                   "base model's own, bfloat16 for the embedded model)")
    e.add_argument("--name", help="the GGUF's name (default: the directory's name)")
    e.add_argument("--overwrite", action="store_true", help="replace a GGUF of the same name, or a model/ exported "
                   "in another dtype")
    d = sub.add_parser("demo", help="distil country -> capital into the embedded SmolLM2-135M", description="the built-in demo")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--model", default="embedded", help="model id or path (default: the embedded SmolLM2)")
    d.add_argument("--overwrite", action="store_true", help="redo every stage")
    return p




def _record(cfg, argv: list[str]) -> None:
    """Append the command line to <out>/commands.txt, so reports say what produced them (once per run)."""
    from ctxdistill.core import distributed

    if not distributed.is_main():
        return
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: out_dir exists and is a file")
    out.mkdir(parents=True, exist_ok=True)
    from ctxdistill.core.files import claim_dir

    claim_dir(out)  # one command at a time per out_dir (released when main returns)
    with open(out / "commands.txt", "a") as fh:
        fh.write("ctxdistill " + shlex.join(argv) + "\n")


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    from ctxdistill import report
    from ctxdistill.core import distributed
    from ctxdistill.config import load_config

    if args.command == "bake":
        return _bake(args, argv)
    if args.command == "compare":
        return _compare(args)
    if args.command == "export":
        return _export(args)
    if getattr(args, "num_processes", 0):
        return distributed.relaunch(_without_num_processes(argv), args.num_processes)
    if distributed.launched():
        distributed.engine()  # a launch config ctxdistill cannot train with fails here, before any work
    if args.command == "run":
        from ctxdistill.compose import is_composition, run_composition

        runner = recipe_runner(args.config)
        if distributed.launched() and (is_composition(args.config) or runner):
            raise UserError(f"{args.config}: composition and experiment recipes run as one process; multi-process "
                            "launches take a pipeline config (inputs -> teach -> train -> eval)")

        if is_composition(args.config):
            res = run_composition(args.config, out_dir=str(Path(args.out).resolve()) if args.out else None,
                                  overwrite=args.overwrite)
            print(json.dumps({"training": res["training"],
                              "eval": {k: r["scores"] for k, r in res["eval"].items()}}, indent=2))
            return 0
        if runner:
            rep = runner.run(args.config, argv, quick=args.quick,
                             out_dir=str(Path(args.out).resolve()) if args.out else None)
            print(json.dumps(runner.summary(rep), indent=2))
            return 0
    if args.command == "demo":
        from ctxdistill.demo import demo_config

        cfg = demo_config(args.out, args.model)
    else:
        cfg = load_config(args.config)
        if args.out:
            cfg.out_dir = str(Path(args.out).resolve())
        if getattr(args, "mode", None):
            cfg.train.mode = args.mode
    if args.command != "inputs":
        from ctxdistill.core.models import placement

        placement(cfg.model)  # a GPU-only setting on a machine without it fails here, before any work
        from ctxdistill.core.models import resolve
        from ctxdistill.core.student import init_model_config

        resolve(cfg.model.name)  # a model path that does not exist, or is not a model, too
        if args.command == "run" and cfg.export.gguf:
            from ctxdistill.gguf_export import check_model

            check_model(cfg.model.name)  # a model the GGUF export would refuse, before any training
        if args.command in ("train", "run", "baseline"):
            init_model_config(cfg)
    if args.command == "baseline" and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    _record(cfg, argv)
    if args.command in ("teach", "train", "eval"):  # a stage reads the inputs' files: written here when missing
        from ctxdistill.inputs import prepare_on_main

        prepare_on_main(cfg)
    if args.command == "baseline":
        from ctxdistill.baseline import sft_from_config

        r = sft_from_config(cfg, args.examples, epochs=args.epochs, batch_size=args.batch_size)
        print(json.dumps({k: r[k] for k in ("n_examples", "epochs", "best", "final", "seconds")}, indent=2))
        print(f"curve: {cfg.out / 'baseline_sft'}/curve.json")
    elif args.command == "inputs":
        from ctxdistill.inputs import prepare_inputs

        print(json.dumps(prepare_inputs(cfg), indent=2))
    elif args.command == "teach":
        from ctxdistill.teach import teach

        m = teach(cfg, overwrite=args.overwrite)
        if distributed.is_main():
            print(json.dumps({k: m[k] for k in ("n_inputs", "n_examples", "dropped", "extract_fail_rate",
                                            "teacher_mean_answer_prob")}, indent=2))
    elif args.command == "train" and (args.sft or args.sft_teacher):
        from ctxdistill.baseline import sft_model_from_config

        s = sft_model_from_config(cfg, args.sft, args.sft_teacher, overwrite=args.overwrite)
        print(json.dumps({k: s[k] for k in ("n_examples", "steps", "seconds", "first_loss", "final_loss")}, indent=2))
        print(f"model: {cfg.out / 'sft'}")
    elif args.command == "train":
        from ctxdistill.train import train

        s = train(cfg, overwrite=args.overwrite)
        if distributed.is_main():
            print(json.dumps({k: s[k] for k in ("n_examples", "steps", "seconds", "first_loss", "final_loss")}, indent=2))
    else:
        if args.command == "eval":
            from ctxdistill.pipeline import evaluate_and_card

            rep = evaluate_and_card(cfg)
        else:
            from ctxdistill.pipeline import run

            rep = run(cfg, overwrite=args.overwrite)
            if rep is None:  # another rank of a multi-process run: the main process reports
                return 0
        report.print_table(rep)
        print(f"results: {cfg.out / 'eval'}/report.json, report.md, report.png")
    return 0


def _bake(args: argparse.Namespace, argv: list[str]) -> int:
    from ctxdistill import baking, report
    from ctxdistill.config import to_toml
    from ctxdistill.core.files import write_atomic
    from ctxdistill.pipeline import run

    overrides = dict(baking.parse_override(x) for x in args.set)
    for key, value, name in (("data.synth.n", args.n_inputs, "--n-inputs"), ("data.n_eval", args.n_eval, "--n-eval")):
        if value is not None:
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
            overrides[key] = value
    for key, value in (("export.gguf", args.gguf), ("export.dtype", args.dtype)):
        if value is not None:
            overrides[key] = value
    checks = [{"name": r, "regex": r} for r in args.check] + [{"name": e, "python": e} for e in args.check_python]
    path = lambda f: Path(f) if f else None  # noqa: E731 - a path is a file to read, not text
    cfg = baking.bake_config(args.model, path(args.system_prompt), shots=path(args.shots), seeds=path(args.seeds),
                             checks=checks, eval_inputs=path(args.eval), facts=path(args.facts), out=args.out,
                             merge=args.merge, overrides=overrides)
    baking.preflight(cfg)
    if args.config:
        write_atomic(Path(args.config), to_toml(cfg))
        print(f"wrote {args.config}; run it with: ctxdistill run {args.config}")
        return 0
    baking.claim_out(cfg, args.overwrite)
    _record(cfg, argv)
    rep = run(cfg)
    report.print_table(rep)
    print(f"results: {cfg.out / 'eval'}/report.json, report.md, report.png")
    if cfg.export.merge:
        print(f"model: {cfg.out / 'model'} (transformers' from_pretrained or pipeline('text-generation'); "
              "model card in README.md)")
    if cfg.export.gguf:
        from ctxdistill import gguf_export

        g = gguf_export.gguf_path(cfg.out / "model", gguf_export.default_name(cfg.out), cfg.export.gguf)
        print(f"gguf: {g} (llama.cpp: llama-cli -m {g.name}; Ollama: ollama create NAME -f Modelfile, in {g.parent})")
    print(f"by eye: ctxdistill compare {cfg.out} \"a message\"; again: ctxdistill run {cfg.out / baking.CONFIG_NAME}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ctxdistill import export, gguf_export

    target = Path(args.target)
    if args.format == "hf":
        if args.quant or args.name:
            raise UserError("--quant and --name are for --format gguf")
        return _export_hf(target, args.dtype, args.overwrite)
    if args.dtype:
        raise UserError("--dtype is for --format hf (the HF weights); a GGUF's tensor type is --quant f16 or q8_0")
    res = gguf_export.export_gguf(target, args.quant or "f16", overwrite=args.overwrite, name=args.name)
    card = export.refresh_card(res["gguf"].parent)
    print(f"gguf: {res['gguf']} ({res['quant']}, {res['bytes'] / 1e6:.1f} MB, sha256 {res['sha256']})")
    print(f"Modelfile: {res['modelfile']}" + (f"; model card: {card}" if card else ""))
    name = gguf_export.ollama_name(args.name or gguf_export.default_name(target))
    print(f"run it: cd {res['gguf'].parent} && ollama create {name} -f Modelfile && ollama run {name}; "
          f"or llama-cli -m {res['gguf'].name} -cnv")
    return 0


def _export_hf(target: Path, dtype: str | None, overwrite: bool) -> int:
    from ctxdistill import export
    from ctxdistill.baking import CONFIG_NAME

    dest, dtype = export.reexport(target / CONFIG_NAME, dtype, overwrite)
    print(f"model: {dest} ({dtype})")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ctxdistill.baking import CONFIG_NAME
    from ctxdistill.config import load_config, read_text_file
    from ctxdistill.evaluate import compare

    target = Path(args.target)
    if target.is_dir():
        if not (target / CONFIG_NAME).is_file():
            raise UserError(f"{target}: no {CONFIG_NAME} here; give the run's config file instead")
        target = target / CONFIG_NAME
    cfg = load_config(target)
    inputs = list(args.inputs)
    if args.file:
        inputs += [line.strip() for line in read_text_file(Path(args.file), "--file").splitlines() if line.strip()]
    if not inputs:
        raise UserError("compare: give at least one input (as an argument, or --file FILE with one per line)")
    rows = compare(cfg, inputs)
    console = Console()
    for r in rows:
        t = Table(title=f"input: {r['input']}", show_lines=True, expand=True)
        for name in ("base, no context", "teacher, with context", "student, no context"):
            t.add_column(name, ratio=1)
        t.add_row(Text(r["base"]), Text(r["teacher"]), Text(r["student"]))  # replies as text, not rich markup
        console.print(t)
    return 0


def recipe_runner(path: str):
    """The runner of a recipe that is not a pipeline config (the paper's experiments, ctxdistill.experiments),
    found through the `ctxdistill.recipes` entry point, so that the pipeline never imports them; or None."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="ctxdistill.recipes"):
        runner = ep.load()  # a module with handles(path), run(path, argv, quick, out_dir) and summary(report)
        if runner.handles(path):
            return runner
    return None


def _without_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)  # argparse itself exits 2 with one usage line on bad flags
    try:
        return _dispatch(args, argv)
    except UserError as e:
        print(f"{errors.PREFIX}{e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        # Disk full, file too large, read-only or not permitted: every write is atomic (temporary name,
        # fsync, rename), so what was complete before is intact and the same command resumes.
        print(f"{errors.PREFIX}{e.filename or 'writing output'}: {e.strerror}; earlier complete "
              "artefacts and checkpoints are intact, rerun when there is room", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctxdistill: interrupted", file=sys.stderr)
        return 130
    finally:
        from ctxdistill.core.files import release_dirs

        release_dirs()
