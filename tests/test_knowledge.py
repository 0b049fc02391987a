"""Baking a prompt's knowledge: passages and self-study inputs, closed-book fact recall, teacher selection by
rule checks and grounding, bootstrap intervals (tiny models; the numbers on the embedded model are in
docs/results.md)."""

import json
import random

import pytest

from ctxdistill.cli import main
from ctxdistill.core.checks import compile_checks, select_score
from ctxdistill.core.metrics import bootstrap_interval, mean_interval, span_match
from ctxdistill.core.specifics import specifics, ungrounded
from ctxdistill.evaluate import fact_recall
from ctxdistill.selfstudy import detail_items, detail_questions, plan, rule_messages, sentences, split_passages

CONTEXT = """You are the assistant of Quillmoor Books. Always mention Quillmoor Books by name.

Quillmoor Books is a bookshop in Duluth, Minnesota, founded in 1987 by Agnes Thorne. We are open Tuesday to Sunday, from 10 AM to 6 PM.

Shipping costs a flat $4.50, and orders over $35 ship free. Standard delivery takes five business days. Call 218-555-0142 or write to help@quillmoor.com.

Returns: unread books can be returned within 30 days for a full refund. Used books are final sale, and gift cards never expire."""


# -- passages ----------------------------------------------------------------------------------------

def test_passages_are_the_paragraphs_and_short_ones_join():
    ps = split_passages(CONTEXT, max_words=120, min_words=15)
    assert [p.text.split()[0] for p in ps] == ["You", "Shipping", "Returns:"]  # the 13-word rule joined the next
    assert ps[0].text.count("\n") == 1 and "Duluth" in ps[0].text
    assert ps[2].topic == "Returns" and ps[0].index == 0 and [p.index for p in ps] == [0, 1, 2]


def test_one_long_paragraph_becomes_windows_of_whole_sentences():
    para = " ".join(f"Sentence number {i} says that item {i} costs ${i}.00 today." for i in range(1, 31))
    ps = split_passages(para, max_words=40, min_words=5)
    assert len(ps) > 1 and all(len(p.text.split()) <= 40 for p in ps)
    assert " ".join(p.text for p in ps).split() == para.split()  # every sentence once, in order
    assert all(p.text.endswith("today.") for p in ps)  # cut between sentences only


def test_a_sentence_longer_than_the_window_is_a_passage_of_its_own():
    long = "This sentence " + "goes on and on " * 30 + "until it ends."
    ps = split_passages(f"Short one here, five words. {long} Another short sentence follows it here.",
                        max_words=20, min_words=1)
    assert any(p.text == long for p in ps) and len(ps) == 3


def test_sentences_do_not_break_after_a_title():
    assert sentences("Dr. Ada Reyes sees cats. She is in on Mondays.") == ["Dr. Ada Reyes sees cats.",
                                                                          "She is in on Mondays."]


def test_specifics_and_grounding():
    found = {(s.kind, s.text) for s in specifics(CONTEXT)}
    assert {("price", "$4.50"), ("price", "$35"), ("phone", "218-555-0142"), ("email", "help@quillmoor.com"),
            ("year", "1987"), ("time", "10 AM"), ("quantity", "30 days"), ("name", "Agnes Thorne"),
            ("quantity", "five business days")} <= found
    assert ungrounded("At Quillmoor Books, shipping is $4.50 and free over $35.", [CONTEXT]) == []
    assert [s.text for s in ungrounded("Call 1-800-555-9999 or visit Amazon.", [CONTEXT])] == ["1-800-555-9999", "Amazon"]
    assert [s.text for s in ungrounded("Returns are accepted within 60 days.", [CONTEXT])] == ["60 days"]
    assert ungrounded("We can help with that, of course!", [CONTEXT]) == []  # nothing stated: nothing invented
    assert ungrounded("Yes, 60 days.", [CONTEXT, "Is it 60 days?"]) == []  # the user's own number


def test_detail_questions_ask_for_one_fact_and_name_what_they_ask_about():
    ps = split_passages(CONTEXT, max_words=120, min_words=15)
    qs = detail_questions(ps[1], frozenset({"quillmoor books", "quillmoor", "books"}))
    assert "Shipping costs a flat how much?" in qs and "Orders over how much ship free?" in qs
    assert "Standard delivery takes how many business days?" in qs
    assert "Call what phone number or write to help@quillmoor.com?" in qs
    items = dict(detail_items(ps[1], frozenset({"quillmoor books", "quillmoor", "books"})))
    assert list(items) == qs and items["Orders over how much ship free?"] == "$35"  # each with what it asks for
    qs0 = detail_questions(ps[0], frozenset({"quillmoor books", "quillmoor", "books"}))
    assert "Quillmoor Books is a bookshop in Duluth, Minnesota, founded in what year by Agnes Thorne?" in qs0
    assert not [q for q in qs0 if q.startswith("You") or "mention" in q]  # instructions to the assistant: none
    msgs = rule_messages(ps[1], "detail", random.Random(0))
    assert len(msgs) == 4 * len(qs) and set(msgs[:len(qs)]) == set(qs)  # each question once before any frame
    assert all(m.endswith("?") for m in msgs)
    assert all(ps[2].topic in m for m in rule_messages(ps[2], "restate", random.Random(0)))


def test_plan_gives_every_passage_an_equal_share():
    q = plan(100, 3, ["detail", "restate", "task", "general"])
    assert sum(q.values()) == 100 and q[-1, "general"] == 25
    per_passage = [sum(v for (i, k), v in q.items() if i == p) for p in range(3)]
    assert max(per_passage) - min(per_passage) <= 1 and sum(per_passage) == 75
    assert plan(10, 4, ["general"]) == {(-1, "general"): 10}
    q = plan(100, 3, ["detail", "general"], general_share=0.5)
    assert q[-1, "general"] == 50 and sum(q.values()) == 100 and sorted(q.values())[:3] == [16, 17, 17]
    assert sum(plan(7, 5, ["detail"]).values()) == 7


# -- fact recall, selection, intervals -------------------------------------------------------------

def test_fact_recall_against_a_hand_count():
    facts = [{"id": "a1", "fact": "fee", "input": "Shipping fee?", "answer": ["$4.50", "4.50"]},
             {"id": "a2", "fact": "fee", "input": "What do you charge to ship?", "answer": ["$4.50", "4.50"]},
             {"id": "b1", "fact": "returns", "input": "Return window?", "answer": ["30 days", "thirty days"]},
             {"id": "b2", "fact": "returns", "input": "How long to return?", "answer": "30 days"}]
    replies = {"teacher": ["It is $4.50.", "We charge 4.50 dollars.", "Within thirty days!", "130 days"],
               "student": ["It is $4.505.", "Free!", "Thirty Days.", "In 30 days"]}
    hits = {s: [span_match(r, f["answer"] if isinstance(f["answer"], list) else [f["answer"]])
                for r, f in zip(replies[s], facts)] for s in replies}
    assert hits == {"teacher": [1, 1, 1, 0], "student": [0, 0, 1, 1]}  # "130 days" and "$4.505" are not hits
    rep = fact_recall(facts, hits)
    assert rep["recall"] == {"teacher": 0.75, "student": 0.5} and rep["n_facts"] == 2 and rep["n_questions"] == 4
    assert rep["by_fact"] == {"fee": {"questions": 2, "teacher": 2, "student": 0},
                              "returns": {"questions": 2, "teacher": 1, "student": 2}}


def test_selection_prefers_passing_checks_then_grounding_then_more_facts():
    checks = compile_checks([{"name": "names the shop", "regex": "(?i)quillmoor"}])
    rules = ["checks", "grounded"]

    def rank(replies, x="How much is shipping?"):
        return max(range(len(replies)), key=lambda i: (*select_score(replies[i], x, checks, CONTEXT, rules), -i))
    # an invented price loses to a grounded reply, whatever the checks say of it
    assert rank(["At Quillmoor Books shipping is $9.99.", "At Quillmoor Books shipping is $4.50."]) == 1
    # a passed check wins over a failed one
    assert rank(["Shipping is $4.50.", "Quillmoor Books ships your order."]) == 1
    # all else equal: the reply that states more of the context's facts
    assert rank(["Quillmoor Books ships books.", "Quillmoor Books charges $4.50, free over $35."]) == 1
    # a full tie keeps the first drawn
    assert rank(["Quillmoor Books is glad to help.", "Quillmoor Books is happy to help."]) == 0
    # the grounded check itself, as task.checks writes it
    g = compile_checks([{"grounded": True}], CONTEXT)[0]
    assert g.name == "grounded" and g.test("It is $4.50.", "") and not g.test("It is $5.50.", "")


def test_bootstrap_intervals():
    ones = mean_interval([1.0] * 20)
    assert ones == [1.0, 1.0] and mean_interval([]) == [0.0, 0.0]
    half = mean_interval([1.0, 0.0] * 24)
    assert half[0] < 0.5 < half[1] and half == mean_interval([1.0, 0.0] * 24)  # repeatable (seeded)
    wide, narrow = mean_interval([1.0, 0.0] * 8), mean_interval([1.0, 0.0] * 200)
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    assert 0.12 < half[1] - half[0] < 0.4  # +-0.14 binomial at n=48
    assert bootstrap_interval(lambda idx: float(len(idx)), 5) == [5.0, 5.0]


# -- the inputs stage, and a bake, on the tiny chat model --------------------------------------------

def _context_config(tmp_path, tiny_chat_model_dir, context: str = CONTEXT, **synth) -> "Config":
    from ctxdistill.baking import bake_config

    (tmp_path / "ctx.txt").write_text(context)
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"input": "Shipping costs a flat how much?", "answer": "$4.50"}) + "\n"
                     + json.dumps({"input": "Where is the shop?", "answer": ["Duluth"]}) + "\n")
    over = {"data.synth.prompt": "passages", "data.synth.n": 24, "data.n_eval": 4, "data.synth.max_new_tokens": 16,
            "data.synth.passage_words": 120, "data.synth.general_share": 0.0,
            **{f"data.synth.{k}": v for k, v in synth.items()}}
    return bake_config(str(tiny_chat_model_dir), tmp_path / "ctx.txt", facts=facts, out=tmp_path / "out",
                       overrides=over)


def test_self_study_gives_each_passage_its_share_and_never_a_fact_question(tmp_path, tiny_chat_model_dir):
    from ctxdistill.inputs import prepare_inputs

    cfg = _context_config(tmp_path, tiny_chat_model_dir, kinds=["detail", "restate", "general"])
    stats = prepare_inputs(cfg)
    syn = stats["synth"]
    # 24 training inputs + 4 held out. Plan: general 24/3 = 8 (+ the 4 held out), 16 over 4 passages x 2 rule
    # kinds = 2 each; the first passage (the rule to name the shop) has no fact to ask about, so its 2 detail
    # questions move to the model-written kind: general.
    counts = [p["counts"] for p in syn["passages"]]
    assert len(counts) == 4 and all(c["restate"] == 2 for c in counts)
    assert [c["detail"] for c in counts] == [0, 2, 2, 2] and syn["shortfall_moved_to_model"] == {"0:detail": 2}
    assert syn["by_kind"] == {"detail": 6, "restate": 8, "general": 14}
    assert syn["rejected"].get("equals a facts question") == 1  # the echo question the facts file asks
    train = [json.loads(x) for x in open(cfg.out / "inputs/train.jsonl")]
    evals = [json.loads(x) for x in open(cfg.out / "inputs/eval.jsonl")]
    assert "Shipping costs a flat how much?" not in {r["input"] for r in train}
    assert {r["kind"] for r in evals} == {"general"} and len(evals) == 4  # held out: users' kind of message
    assert {r["kind"] for r in train} == {"detail", "restate", "general"}
    assert all(isinstance(r["passage"], int) for r in train if r["kind"] != "general")
    assert (cfg.out / "inputs/facts.jsonl").is_file() and stats["n_facts"] == 2
    # the same synthesis again is reused, not redone
    assert prepare_inputs(cfg) == stats


def test_paraphrase_requests_rewrite_one_detail_question(tmp_path, tiny_chat_model_dir):
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.selfstudy import PARAPHRASE_DEMOS, paraphrase_prompt

    user, cont = paraphrase_prompt("Orders over how much ship free?", list(PARAPHRASE_DEMOS[:2]))
    assert "customer" in user and cont.endswith("Question: Orders over how much ship free?\nCustomer:")
    assert cont.count("Customer: ") == 2 and "Quillmoor" not in cont  # the examples are about other businesses
    cfg = _context_config(tmp_path, tiny_chat_model_dir, kinds=["paraphrase", "general"])
    syn = prepare_inputs(cfg)["synth"]
    # the opening passage has no detail question to rewrite: its share (24/2 over 4 passages = 3) goes to general
    assert syn["shortfall_moved_to_model"] == {"0:paraphrase": 3}
    train = [json.loads(x) for x in open(cfg.out / "inputs/train.jsonl")]
    assert all(r["passage"] > 0 for r in train if r["kind"] == "paraphrase")


def test_the_passage_teacher_sees_the_opening_the_instructions_and_its_own_passage_only(tmp_path,
                                                                                      tiny_chat_model_dir):
    from ctxdistill.prompts import row_teacher_template

    closing = "Remember: begin every reply with \"At Quillmoor\". Never promise a delivery date."
    cfg = _context_config(tmp_path, tiny_chat_model_dir, context=CONTEXT + "\n\n" + closing)
    cfg.teach.context = "passage"
    system = row_teacher_template(cfg, {"id": "x", "input": "?", "passage": 3, "kind": "detail"}).system
    assert system.startswith("You are the assistant of Quillmoor Books.") and "Returns: unread books" in system
    assert system.endswith(closing)  # the rules that shape the voice, in the context's order
    assert "Shipping costs" not in system and "Duluth" not in system
    for row in ({"kind": "general"}, {"kind": "restate", "passage": 3}):  # the voice comes from the whole context
        whole = row_teacher_template(cfg, {"id": "y", "input": "?", **row}).system
        assert "Shipping costs" in whole and "Duluth" in whole
    with pytest.raises(Exception, match="names passage 9"):
        row_teacher_template(cfg, {"id": "z", "input": "?", "passage": 9, "kind": "paraphrase"})


def test_a_training_file_with_a_fact_question_loses_it_and_counts_it(tmp_path, tiny_task):
    from ctxdistill.config import load_config
    from ctxdistill.inputs import prepare_inputs

    cfg_path = tiny_task(**{"data.facts": '"facts.jsonl"'})
    train = [json.loads(x) for x in open(tmp_path / "train.jsonl")]
    (tmp_path / "facts.jsonl").write_text(json.dumps({"input": train[3]["input"], "answer": "x"}) + "\n")
    stats = prepare_inputs(load_config(cfg_path))
    assert stats["train_equal_to_a_fact_question"] == 1 and stats["n_train"] == len(train) - 1


@pytest.fixture(scope="module")
def knowledge_bake(tmp_path_factory, tiny_chat_model_dir):
    """A bake with self-study inputs (the teacher given the passage), a facts file, and the best of 3 teacher
    candidates."""
    d = tmp_path_factory.mktemp("kbake")
    (d / "ctx.txt").write_text(CONTEXT)
    (d / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"input": "What does shipping cost?", "answer": ["$4.50", "4.50"], "fact": "fee"},
        {"input": "How much is postage on a small order?", "answer": "$4.50", "fact": "fee"},
        {"input": "Which city is the shop in?", "answer": "Duluth", "fact": "city"}]))
    argv = ["bake", "--model", tiny_chat_model_dir, "--system-prompt", d / "ctx.txt", "--facts", d / "facts.jsonl",
            "--out", d / "out", "--check", "(?i)quillmoor", "--n-inputs", "16", "--n-eval", "4",
            "--set", "data.synth.prompt=\"passages\"", "--set", "teach.samples=3", "--set", "teach.context=\"passage\"",
            "--set", 'data.synth.kinds=["detail", "restate", "recite", "task", "general"]',
            "--set", "data.synth.general_share=0",  # equal shares: every kind gets rows at 16 inputs
            "--set", "generation.max_new_tokens=12", "--set", "eval.max_new_tokens=12",
            "--set", "data.synth.max_new_tokens=16"]
    assert main([str(a) for a in argv]) == 0
    return d / "out"


def test_bake_reports_fact_recall_and_intervals(knowledge_bake):
    out = knowledge_bake
    rep = json.loads((out / "eval/report.json").read_text())
    facts = rep["facts"]
    assert facts["n_questions"] == 3 and facts["n_facts"] == 2 and set(facts["recall"]) == {"base", "teacher", "student"}
    rows = [json.loads(x) for x in open(out / "eval/facts.jsonl")]
    assert len(rows) == 3
    for s in ("base", "teacher", "student"):  # the recall is the hand count of the written replies
        hand = sum(span_match(r[s]["reply"], r["answer"]) for r in rows) / 3
        assert facts["recall"][s] == pytest.approx(hand, abs=1e-4) and all(r[s]["hit"] in (True, False) for r in rows)
    ci = rep["intervals"]
    for s in ("base", "teacher", "student"):
        lo, hi = ci["facts"][s]
        assert lo <= facts["recall"][s] <= hi
        lo, hi = ci["checks"]["(?i)quillmoor"][s]
        assert lo <= rep["checks"]["(?i)quillmoor"][s] <= hi
    assert set(ci["kl"]) == {"base", "student"} and len(ci["kl_gap_closed"]) == 2
    assert "per_answer" not in rep["fidelity"]
    sel = rep["teach"]["selection"]
    assert sel["samples"] == 3 and sel["kept"] < rep["teach"]["n_examples"] and sel["kept"] <= sel["candidates"] <= 3 * 16
    assert set(sel["pass_rate_before"]) == {"(?i)quillmoor", "grounded"}
    md = (out / "eval/report.md").read_text()
    assert "fact recall" in md and "Fact recall: 3 closed-book questions on 2 facts" in md and "95% bootstrap" in md
    card = (out / "model/README.md").read_text()
    assert "fact recall" in card and "Teacher samples: the best of 3" in card
    # the passage inputs were answered with their passage, the others with the whole context: both stored
    from ctxdistill.store import read_store

    _, examples = read_store(out / "teacher")
    train_rows = {json.loads(x)["input"]: json.loads(x) for x in open(out / "inputs/train.jsonl")}
    kinds = {train_rows[e.meta["input"]].get("kind") for e in examples}
    assert "general" in kinds and kinds & {"detail", "restate"}
    # questions about one fact are answered greedily (teach.fact_temperature 0: one candidate, no selection);
    # the rest are the best of 3 samples
    kind_of = {e.id: train_rows[e.meta["input"]].get("kind") for e in examples}
    assert all("candidate" not in e.meta for e in examples if kind_of[e.id] == "detail")
    assert all(0 <= e.meta["candidate"] < 3 for e in examples if kind_of[e.id] == "general")
    # a recitation's answer is its passage, word for word, scored rather than sampled
    recited = [e for e in examples if train_rows[e.meta["input"]].get("kind") == "recite"]
    assert recited and all(e.meta["answer"] == train_rows[e.meta["input"]]["target"] for e in recited)
    assert all(e.meta["labels"] == "rescored" and e.terminated for e in recited)
    assert not [r for r in train_rows.values() if r.get("kind") == "recite" and r["passage"] == 0]  # the rules
    # the facts never reached training
    train = {json.loads(x)["input"] for x in open(out / "inputs/train.jsonl")}
    assert not train & {r["input"] for r in rows}


def test_the_terminal_table_fits_80_columns_with_its_intervals(knowledge_bake, monkeypatch, capsys):
    from ctxdistill import report

    rep = json.loads((knowledge_bake / "eval/report.json").read_text())
    monkeypatch.setenv("COLUMNS", "80")
    report.print_table(rep)
    out = capsys.readouterr().out
    table = out[:out.index("base and student without")]
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in table
    assert "recall" in table
