"""`ctxdistill baseline sft`: direct gradient descent on labelled examples, evaluated every epoch."""

import json
import os
import subprocess
import sys

from conftest import country_rows, tiny_toml, write_jsonl


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ctxdistill", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CTXDISTILL_QUIET": "1"}, timeout=600)


def test_sft_baseline_reports_the_whole_curve_and_the_best_epoch(tmp_path, tiny_model_dir):
    train, evals = country_rows(8, 4)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", evals)
    labelled = [{"input": r["input"], "reference": r["reference"]} for r in evals]  # learn the eval answers
    write_jsonl(tmp_path / "examples.jsonl", labelled)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(tiny_toml(tiny_model_dir, tmp_path / "run", **{"train.lr": "2e-2", "task.scorer": '"contains"'}))
    r = _cli("baseline", "sft", cfg, "--examples", tmp_path / "examples.jsonl", "--epochs", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "run/baseline_sft/curve.json").read_text())
    assert rep["n_examples"] == 4 and rep["batch_size"] == 4 and [c["epoch"] for c in rep["curve"]] == list(range(1, 9))
    assert rep["best"] == max(rep["curve"], key=lambda c: c["score"]) and rep["final"] == rep["curve"][-1]
    assert rep["curve"][-1]["train_loss"] < 0.7 * rep["curve"][0]["train_loss"]  # it does learn the examples
    assert all(0.0 <= c["score"] <= 1.0 for c in rep["curve"])
    # Bad input: one line, exit 2, nothing written.
    write_jsonl(tmp_path / "bad.jsonl", [{"input": "Peru"}])
    r = _cli("baseline", "sft", cfg, "--examples", tmp_path / "bad.jsonl", "--out", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr.strip() == (f"ctxdistill: error: {tmp_path / 'bad.jsonl'}:1: eval inputs need a "
                                                      "'reference' (a string or a list of strings)")
    assert not (tmp_path / "bad" / "baseline_sft").exists()


def test_accumulated_step_equals_one_big_batch(tmp_path, tiny_model_dir):
    """The baseline's all-in-one-batch step, run 2 rows at a time, gives the one-batch gradient."""
    import torch

    from ctxdistill.baseline import _step, labelled_examples
    from ctxdistill.config import load_config
    from ctxdistill.core.models import load_tokenizer
    from ctxdistill.core.student import setup_model

    train, evals = country_rows(4, 5)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", evals)
    (tmp_path / "cfg.toml").write_text(tiny_toml(tiny_model_dir, tmp_path / "run", **{"train.lr": "1e-2"}))
    cfg = load_config(tmp_path / "cfg.toml")
    tok = load_tokenizer(cfg.model.name)
    batch = labelled_examples(cfg, tok, evals)
    weights = []
    for micro in (5, 2):
        cfg.train.batch_size = micro
        torch.manual_seed(0)
        model = setup_model(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        _step(model, opt, sched, batch, cfg.train, tok)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], atol=1e-5, rtol=1e-4, msg=n)
