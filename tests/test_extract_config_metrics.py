"""Answer extraction, config loading and the evaluation metrics."""


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxdistill.config import ExtractorConfig, config_from_dict, load_config, to_toml
from ctxdistill.core.errors import UserError
from ctxdistill.core.metrics import contains, exact_match, normalize, rouge_l
from ctxdistill.core.extract import answer_text, extract


def test_extractors():
    assert answer_text(ExtractorConfig(kind="whole"), "  Paris \n") == "Paris"
    assert answer_text(ExtractorConfig(kind="marker", marker="Answer:"), "x Answer: 1 Answer: 42\n") == "42"
    rx = ExtractorConfig(kind="regex", pattern=r"\bis\s+([^.\n]+)")
    assert answer_text(rx, "The capital city of France is Paris. It is big") == "Paris"
    assert extract(rx, "no verb here") is None
    assert answer_text(ExtractorConfig(kind="whole", stop=".\n"), "Kabul. The capital") == "Kabul"
    assert extract(ExtractorConfig(kind="whole"), "   ") is None


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_extract_never_raises(text):
    for cfg in (ExtractorConfig(kind="whole", stop=".,"), ExtractorConfig(kind="marker", marker="=>"),
                ExtractorConfig(kind="regex", pattern=r"(\d+)?x", group=1)):
        span = extract(cfg, text)
        assert span is None or 0 <= span[0] < span[1] <= len(text)


def test_bad_extractor_configs():
    with pytest.raises(UserError, match="pattern"):
        ExtractorConfig(kind="regex", pattern="(unclosed")
    with pytest.raises(UserError, match="group"):
        ExtractorConfig(kind="regex", pattern="(a)", group=2)
    with pytest.raises(UserError, match="kind"):
        ExtractorConfig(kind="magic")


MINIMAL = {"task": {"teacher": "Context. {input}"}, "data": {"train": "t.jsonl", "eval": "e.jsonl"}}


def test_config_defaults_and_roundtrip(tmp_path):
    cfg = config_from_dict(MINIMAL)
    assert cfg.generation.temperature == 1.0 and cfg.teach.top_k == 20 and cfg.model.name == "embedded"
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    again = load_config(tmp_path / "c.toml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("raw, field", [
    ({**MINIMAL, "train": {"lrr": 1.0}}, "train.lrr"),
    ({"data": MINIMAL["data"]}, "task"),
    ({**MINIMAL, "task": {"teacher": "no placeholder"}}, "task.teacher"),
    ({**MINIMAL, "task": {"teacher": "{input} {input}"}}, "task.teacher"),
    ({**MINIMAL, "task": {"teacher": "{inptu}"}}, "task.teacher"),
    ({**MINIMAL, "train": {"lr": -1.0}}, "train.lr"),
    ({**MINIMAL, "train": {"lr": float("nan")}}, "train.lr"),
    ({**MINIMAL, "train": {"epochs": "3"}}, "train.epochs"),
    ({**MINIMAL, "train": {"loss_chunk": -1}}, "train.loss_chunk"),
    ({**MINIMAL, "train": {"grad_accum": 0}}, "train.grad_accum"),
    ({**MINIMAL, "train": {"early_stop_cooldown": 1.5}}, "train.early_stop_cooldown"),
    ({**MINIMAL, "generation": {"temperature": -0.5}}, "generation.temperature"),
    ({**MINIMAL, "task": {"teacher": "{input}", "scorer": "bleu"}}, "task.scorer"),
])
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        config_from_dict(raw)


def test_metrics():
    assert normalize("The  Hague!") == "hague"
    assert exact_match("Paris.", ["paris"]) == 1.0 and exact_match("Paris, France", ["Paris"]) == 0.0
    assert contains("It is Paris, France", ["Paris"]) == 1.0 and contains("Parisian", ["Paris"]) == 0.0
    assert rouge_l("a b c d", ["a c d"]) == pytest.approx(2 * (3 / 4) * 1.0 / (3 / 4 + 1.0))
    assert rouge_l("", ["x"]) == 0.0 and rouge_l("x y", ["z", "y x"]) == pytest.approx(0.5)
