"""Compositions of distillations (paper §2.3, DESIGN.md §1): several contexts into one student.

  simultaneous(parts, out)   one student trained on the union of several distillation sets, each made
                             by its own config (its own teacher context, student template and inputs):
                             L = sum_k L(D_k, T_student,k, T_teacher,k, f_k). E.g. several tasks behind
                             task ids.
  sequential(stages, out)    student k+1 starts from student k and learns stage k+1's context; the
                             teacher stays each config's model with its context. A stage is one config
                             or a list of them (distilled simultaneously). E.g. re-mapping task ids to
                             overwrite what they meant.

Each part's inputs and teacher pass live in the part's own out_dir (reused when up to date, like
`ctxdistill teach`); the composed student is written under `out`. With LoRA, a stage's adapter is merged
into full weights (`<stage>/merged/`) so that the next stage starts from them.

From a config file, `ctxdistill run FILE` with a [compose] table:

    out_dir = "runs/composed"
    [compose]
    stages = [["id1.toml", "id2.toml"], ["id3.toml"]]   # simultaneous within a stage, sequential across
    init = ""                                          # optional starting weights (a model directory)

then evaluates the final student on the eval split of every part of the last stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ctxdistill.config import Config, _build, _check, load_config
from ctxdistill.core.errors import UserError
from ctxdistill.core.progress import log


def stage_config(parts: list[Config], out: Path, init: str) -> Config:
    """The config the composed student trains under: the first part's settings, `out`, and `init`."""
    if not parts:
        raise UserError("compose: a stage needs at least one config")
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        for section in ("model", "train"):
            if getattr(p, section) != getattr(first, section):
                raise UserError(f"compose: part {i} ({p.task.name}) has a different [{section}] section than part 0 "
                                f"({first.task.name}); parts trained together must share it")
    if first.train.mode != "offline":
        raise UserError("compose: train.mode must be 'offline' (composition trains on stored teacher answers)")
    return dataclasses.replace(first, out_dir=str(Path(out).resolve()),
                               train=dataclasses.replace(first.train, init=str(init) if init else first.train.init))


def distillation_sets(parts: list[Config], overwrite: bool = False) -> tuple[list[list], int, list[str], list[dict]]:
    """Run (or reuse) each part's inputs and teacher pass; return each part's examples, the shared
    terminator id, each part's store hash, and per-part counts."""
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.store import read_store
    from ctxdistill.teach import teach

    sets, hashes, counts, terminators = [], [], [], set()
    for p in parts:
        prepare_inputs(p)
        manifest = teach(p, overwrite=overwrite)
        _, ex = read_store(p.out / "teacher")
        sets.append(ex)
        hashes.append(manifest["hashes"]["all"])
        terminators.add(manifest["terminator_id"])
        counts.append({"task": p.task.name, "store": str(p.out / "teacher"), "n_examples": len(ex),
                       "dropped": manifest["dropped"]})
    if len(terminators) != 1:
        raise UserError(f"compose: the parts' distillation sets end answers with different terminators {sorted(terminators)}")
    return sets, terminators.pop(), hashes, counts


def set_hash(hashes: list[str], averaged: bool = False) -> str:
    """The content hash of a composed distillation set, from its parts' store hashes."""
    # "averaged" names the method: the kept answer is the averaged teacher's best candidate.
    return hashlib.sha256(json.dumps(["averaged:best-candidate", *hashes] if averaged else hashes).encode()).hexdigest()[:16]


def averaged_set(parts: list[Config], sets: list[list]) -> tuple[list, dict]:
    """One example per input and sample, its soft labels averaged over every part's teacher (H5).

    The parts must share the inputs, the student template, the extractor and the generation settings;
    they differ in their teacher context. Each teacher's sampled answer is a candidate; every teacher
    scores every candidate, and the candidate the averaged teacher finds most likely is kept with the
    averaged distribution as its labels (teacher.averaged_labels).
    """
    from ctxdistill.store import load_split, store_hashes
    from ctxdistill.teach import averaged_labels

    ref = store_hashes(parts[0])
    for i, p in enumerate(parts[1:], 1):
        h = store_hashes(p)
        for key in ("inputs", "student_template", "extractor", "generation"):
            if h[key] != ref[key]:
                raise UserError(f"compose: average_teachers needs parts that differ only in their teacher context; "
                                f"part {i} ({p.task.name}) has a different {key}")
    by_id = [{e.id: e for e in s} for s in sets]
    candidates, no_answer = [], 0
    for row in load_split(parts[0], "train"):
        for s in range(parts[0].generation.samples_per_input):
            exs = [d[f"{row['id']}#{s}"] for d in by_id if f"{row['id']}#{s}" in d]
            if exs:
                candidates.append((row, exs))
            else:
                no_answer += 1
    return averaged_labels(parts, candidates), {"no teacher kept an answer": no_answer} if no_answer else {}


def simultaneous(parts: list[Config], out: str | Path, *, init: str | Path = "", overwrite: bool = False,
                 average_teachers: bool = False) -> dict:
    """Train one student on the parts' distillation sets into `<out>/student/`.

    By default the student learns the union of the sets (independent contexts, e.g. tasks behind ids).
    With `average_teachers`, the parts are K teacher prompts for the same inputs (e.g. each with another
    subset of more examples than one window holds): every teacher scores every teacher's answer, and the
    student learns the answer the averaged teacher prefers with the averaged distribution, once per input
    (see `averaged_set`).

    The student starts from `init` (a model directory) when given, else from the parts' model (or their
    train.init). Model and train settings come from the parts, which must agree on them. Returns the
    training summary, with the examples each part contributed under "parts".
    """
    from ctxdistill.train import fit_student

    parts = list(parts)
    cfg = stage_config(parts, Path(out), str(init))
    sets, eos_id, hashes, counts = distillation_sets(parts, overwrite)
    if average_teachers:
        examples, dropped = averaged_set(parts, sets)
        data_hash, extra = set_hash(hashes, averaged=True), {"averaged_teachers": len(parts), "averaged_dropped": dropped}
    else:
        examples, data_hash, extra = [e for s in sets for e in s], set_hash(hashes), {}
    log(f"compose: simultaneous, {len(parts)} part(s){', teachers averaged' if average_teachers else ''}, "
        f"{len(examples)} examples -> {cfg.out / 'student'}")
    return fit_student(cfg, examples, eos_id, data_hash, overwrite, parts=counts, **extra)


def student_weights(cfg: Config) -> Path:
    """A directory of full weights for the student in `<cfg.out>/student/`: that directory for full
    fine-tuning; for LoRA, the adapter merged into its base, saved once in `<cfg.out>/merged/`."""
    from ctxdistill.export import full_weights

    return full_weights(cfg, cfg.out / "merged", copy_whole=False)


def sequential(stages: list, out: str | Path, *, init: str | Path = "", overwrite: bool = False) -> list[dict]:
    """Distil the stages in order into `<out>/stage<k>/student/`, each starting from the one before.

    A stage is a Config or a list of Configs (trained simultaneously). The first stage starts from `init`
    when given, else from the model. Returns one summary per stage, each with "weights": the directory of
    that stage's full weights (the start of the next stage).
    """
    out = Path(out)
    prev, summaries = str(init), []
    for k, stage in enumerate(stages, 1):
        parts = list(stage) if isinstance(stage, (list, tuple)) else [stage]
        log(f"compose: sequential stage {k}/{len(stages)}" + (f", from {prev}" if prev else ""))
        summary = simultaneous(parts, out / f"stage{k}", init=prev, overwrite=overwrite)
        prev = str(student_weights(stage_config(parts, out / f"stage{k}", prev)))
        summaries.append({**summary, "weights": prev})
    return summaries


# -- from a config file --------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ComposeConfig:
    stages: list = field(metadata={"help": "Lists of config files (relative to this file): simultaneous within a "
                                           "list, sequential across lists. A plain string is a one-part stage."})
    init: str = field(default="", metadata={"help": "Starting weights of the first stage: a model directory; '' = the model."})

    def __post_init__(self) -> None:
        _check(bool(self.stages), "compose.stages", "must list at least one stage")
        for i, s in enumerate(self.stages):
            ok = isinstance(s, str) or (isinstance(s, list) and s and all(isinstance(x, str) for x in s))
            _check(ok, f"compose.stages[{i}]", "must be a config path or a non-empty list of them")


def is_composition(path: str | Path) -> bool:
    try:
        return "compose" in tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # load_config reports the problem


def load_composition(path: str | Path, out_dir: str | None = None) -> tuple[list[list[Config]], Path, str]:
    """(stages of Configs, out directory, init) from a file with a [compose] table."""
    p = Path(path)
    raw = tomllib.loads(p.read_text(encoding="utf-8"))
    unknown = sorted(set(raw) - {"compose", "out_dir"})
    if unknown:
        raise UserError(f"{p}: [{unknown[0]}]: a composition file holds only out_dir and [compose]; "
                        "settings belong in the part configs")
    comp = _build(ComposeConfig, raw["compose"], "compose", str(p))
    stages = [[load_config(p.parent / q) for q in ([s] if isinstance(s, str) else s)] for s in comp.stages]
    out = Path(out_dir or raw.get("out_dir", f"runs/{p.stem}"))
    init = comp.init and str((p.parent / comp.init).resolve())
    return stages, (out if out.is_absolute() else p.parent / out).resolve(), init


def run_composition(path: str | Path, out_dir: str | None = None, overwrite: bool = False) -> dict:
    """Compose as the file says, then evaluate the final student on each last-stage part's eval split
    (into `<out>/eval/<task name>/`). Returns {"training": summaries, "eval": reports}."""
    from ctxdistill.evaluate import evaluate

    stages, out, init = load_composition(path, out_dir)
    if len(stages) == 1:
        summaries = [simultaneous(stages[0], out, init=init, overwrite=overwrite)]
        final = stage_config(stages[0], out, init)
    else:
        summaries = sequential(stages, out, init=init, overwrite=overwrite)
        final = stage_config(stages[-1], out / f"stage{len(stages)}", summaries[-2]["weights"])
    reports = {p.task.name: evaluate(p, student=final, eval_dir=out / "eval" / p.task.name) for p in stages[-1]}
    return {"training": [{k: s[k] for k in ("n_examples", "steps", "seconds", "first_loss", "final_loss")}
                         for s in summaries], "eval": reports}
