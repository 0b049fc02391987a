"""The `ctxdistill` command: one thin subcommand per library function.

    ctxdistill inputs CONFIG      -> inputs.prepare_inputs
    ctxdistill teach CONFIG       -> teacher.teach
    ctxdistill train CONFIG       -> train.train; with --sft/--sft-teacher FILE -> baseline.sft_model_from_config
    ctxdistill eval CONFIG        -> evaluate.evaluate
    ctxdistill run CONFIG         -> pipeline.run (all of the above); a [compose] file -> compose.run_composition;
                                     an [experiment] recipe -> experiments.run_experiment
    ctxdistill baseline sft CONFIG --examples FILE -> baseline.sft_from_config
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

from ctxdistill import errors
from ctxdistill.errors import UserError


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
    d = sub.add_parser("demo", help="distil country -> capital into the embedded SmolLM2-135M", description="the built-in demo")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--model", default="embedded", help="model id or path (default: the embedded SmolLM2)")
    d.add_argument("--overwrite", action="store_true", help="redo every stage")
    return p




def _record(cfg, argv: list[str]) -> None:
    """Append the command line to <out>/commands.txt, so reports say what produced them (once per run)."""
    from ctxdistill import distributed

    if not distributed.is_main():
        return
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: out_dir exists and is a file")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.txt", "a") as fh:
        fh.write("ctxdistill " + shlex.join(argv) + "\n")


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    from ctxdistill import distributed, report
    from ctxdistill.config import load_config

    if getattr(args, "num_processes", 0):
        return distributed.relaunch(_without_num_processes(argv), args.num_processes)
    if distributed.launched():
        distributed.engine()  # a launch config ctxdistill cannot train with fails here, before any work
    if args.command == "run":
        from ctxdistill.experiments import is_experiment, run_experiment

        from ctxdistill.compose import is_composition, run_composition

        if distributed.launched() and (is_composition(args.config) or is_experiment(args.config)):
            raise UserError(f"{args.config}: composition and experiment recipes run as one process; multi-process "
                            "launches take a pipeline config (inputs -> teach -> train -> eval)")

        if is_composition(args.config):
            res = run_composition(args.config, out_dir=str(Path(args.out).resolve()) if args.out else None,
                                  overwrite=args.overwrite)
            print(json.dumps({"training": res["training"],
                              "eval": {k: r["scores"] for k, r in res["eval"].items()}}, indent=2))
            return 0
        if is_experiment(args.config):
            rep = run_experiment(args.config, argv, quick=args.quick,
                                 out_dir=str(Path(args.out).resolve()) if args.out else None)
            if rep["kind"] == "examples":
                rep = {**rep, "table": [{k: v for k, v in r.items() if k != "details"} for r in rep["table"]]}
            print(json.dumps({k: rep[k] for k in ("kind", "average", "average_where_teacher_helps", "correlation", "skipped_tasks", "token_ratio", "targets", "transfer",
                                                  "rows" if rep["kind"] == "superni_overwrite" else "table")
                              if k in rep}, indent=2))
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
        from ctxdistill.models import placement

        placement(cfg.model)  # a GPU-only setting on a machine without it fails here, before any work
        from ctxdistill.models import resolve
        from ctxdistill.train import init_model_config

        resolve(cfg.model.name)  # a model path that does not exist, or is not a model, too
        if args.command in ("train", "run", "baseline"):
            init_model_config(cfg)
    if args.command == "baseline" and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    _record(cfg, argv)
    if args.command == "baseline":
        from ctxdistill.baseline import sft_from_config

        r = sft_from_config(cfg, args.examples, epochs=args.epochs, batch_size=args.batch_size)
        print(json.dumps({k: r[k] for k in ("n_examples", "epochs", "best", "final", "seconds")}, indent=2))
        print(f"curve: {cfg.out / 'baseline_sft'}/curve.json")
    elif args.command == "inputs":
        from ctxdistill.inputs import prepare_inputs

        print(json.dumps(prepare_inputs(cfg), indent=2))
    elif args.command == "teach":
        from ctxdistill.teacher import teach

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
            from ctxdistill.evaluate import evaluate

            rep = evaluate(cfg)
        else:
            from ctxdistill.pipeline import run

            rep = run(cfg, overwrite=args.overwrite)
            if rep is None:  # another rank of a multi-process run: the main process reports
                return 0
        report.print_table(rep)
        print(f"results: {cfg.out / 'eval'}/report.json, report.md, report.png")
    return 0


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
