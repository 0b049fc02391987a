"""GGUF export (gguf_export.py), checked in the real llama.cpp runtime and by transformers' own GGUF loader.

llama.cpp runs in process through `xllamacpp` (a prebuilt llama.cpp wheel; a test-only dependency, in the
`dev` extra), on one thread. Models: the trained tiny chat model (conftest; its greedy replies are confident
and copy the country from the prompt, so they need attention to work), a tiny random model with wider
weights (logits far from uniform), and a real tiny bake.

What "equal" means here: with f16 weights, greedy token ids equal transformers' float32 ids exactly on the
chat model, and every per-token log-probability agrees within LOGPROB_TOL. f16 rounds each weight by up to
2^-11 relatively, which moves a log-probability by ~1e-2 at most on these models (measured: 0.018 on the
wide random model), so a greedy choice can only flip where transformers' own top two are closer than that;
the chat model's are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import one_line_error
from ctxdistill.cli import main
from ctxdistill.core.templates import chat_text, encode

LOGPROB_TOL = 0.05
LOGIT_TOL = 0.05  # transformers' reload against the float32 original; measured 0.022 on the wide model
PROMPTS = ["What is the capital city of France?", "What is the capital city of Japan?", "Tell me about Peru.",
           "What is the capital city of Kenya?", "Write one message that a user might send you.", "Hi!"]
PROMPT = ("You are the travel agent of Globetrotter Tours. Always mention Globetrotter Tours by name.\n"
          "Our phone number is 555-0199. We are open from 9am to 5pm.\n")
SMALL = ["--n-inputs", "16", "--n-eval", "6", "--set", "generation.max_new_tokens=12", "--set",
         "eval.max_new_tokens=12", "--set", "data.synth.max_new_tokens=16", "--set", "teach.samples=2"]


class LlamaCpp:
    """A GGUF loaded by llama.cpp itself (xllamacpp runs the llama.cpp server in this process), one thread."""

    def __init__(self, gguf: Path, n_ctx: int = 512):
        import xllamacpp  # the dev extra; `pip install -e '.[dev]'`

        p = xllamacpp.CommonParams()
        p.model.path = str(gguf)
        p.n_ctx, p.n_parallel, p.warmup = n_ctx, 1, False
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 1
        self.server = xllamacpp.Server(p)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.server

    def chat(self, text: str, n: int) -> dict:
        """Greedy chat completion through llama.cpp's own chat template (the GGUF's) and tokenizer."""
        r = self.server.handle_chat_completions({
            "messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0, "cache_prompt": False,
            "logprobs": True, "top_logprobs": 1, "return_tokens": True, "verbose": True})
        assert "error" not in r, r
        c = r["choices"][0]
        return {"text": c["message"]["content"], "ids": [t["id"] for t in c["logprobs"]["content"]],
                "logprobs": [t["logprob"] for t in c["logprobs"]["content"]], "stop": c["finish_reason"] == "stop",
                "prompt": r["__verbose"]["prompt"], "prompt_tokens": r["usage"]["prompt_tokens"]}

    def first_token(self, prompt: str | list[int]) -> tuple[int, list]:
        """(prompt tokens, the first generated token's top-5 (id, log-prob)) for a text or a token-id prompt."""
        r = self.server.handle_completions({"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 5,
                                            "cache_prompt": False})
        assert "error" not in r, r
        top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return r["usage"]["prompt_tokens"], [(t["id"], t["logprob"]) for t in top]


def hf_greedy(model, tok, text: str, n: int):
    """(prompt ids, greedy new ids, log-softmax at each new position) from transformers in float32, with the
    prompt ctxdistill itself builds (the chat template, no tokens added around it)."""
    ids = encode(tok, chat_text(tok, [{"role": "user", "content": text}]))
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id)
    return ids, out.sequences[0, len(ids):].tolist(), [torch.log_softmax(x[0].double(), -1) for x in out.logits]


def load_hf(d: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(d)


def assert_same_greedy(d: Path, gguf: Path, prompts=PROMPTS, n: int = 16, tol: float = LOGPROB_TOL) -> list[str]:
    """llama.cpp's greedy replies from `gguf` equal transformers' from `d`: token ids (and the terminator),
    the rendered prompt, its token count, and every log-prob within `tol`. Returns the replies."""
    model, tok = load_hf(d)
    replies = []
    with LlamaCpp(gguf) as cpp:
        for text in prompts:
            ids, new, lps = hf_greedy(model, tok, text, n)
            got = cpp.chat(text, n)
            assert got["prompt"] == chat_text(tok, [{"role": "user", "content": text}])  # the GGUF's chat template
            assert got["prompt_tokens"] == len(ids)  # and its tokenizer
            assert got["ids"] == new, (text, got["text"], tok.decode(new))  # the terminator too, when it came
            assert got["stop"] == (new[-1] == tok.eos_token_id)
            worst = max(abs(float(lps[i][t]) - lp) for i, (t, lp) in enumerate(zip(got["ids"], got["logprobs"])))
            assert worst < tol, (text, worst)
            assert got["text"] == tok.decode(got["ids"], skip_special_tokens=True)
            replies.append(got["text"])
    return replies


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tiny_chat_model_dir) -> Path:
    """A copy of the tiny chat model (the exports are written into the model directory)."""
    return Path(shutil.copytree(tiny_chat_model_dir, tmp_path_factory.mktemp("chat") / "chat"))


def wide_model(out: Path, tokenizer_dir: Path, **config) -> Path:
    """A tiny random Llama with weights of std 0.2 (10x the default): logits far from uniform, so a wrong q/k
    order or name shows up; 6 heads sharing 2 kv heads (grouped-query attention) and an untied output layer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      **{"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}, **config})
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return wide_model(tmp_path_factory.mktemp("wide") / "wide", tokenizer_dir)


def assert_first_tokens_agree(d: Path, gguf: Path, prompts=PROMPTS) -> None:
    """The first generated token's top-5 ids and log-probs from llama.cpp match transformers' (a near-tie may
    swap the top two)."""
    model, tok = load_hf(d)
    with LlamaCpp(gguf) as cpp:
        for text in prompts:
            ids = encode(tok, chat_text(tok, [{"role": "user", "content": text}]))
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            _, top = cpp.first_token(ids)
            assert [i for i, _ in top][:2] == lp.topk(2).indices.tolist() or \
                abs(float(lp[top[0][0]]) - float(lp.max())) < LOGPROB_TOL, text
            assert max(abs(float(lp[i]) - v) for i, v in top) < LOGPROB_TOL, text


# -- llama.cpp gives the model's replies -------------------------------------------------------------------

def test_f16_gguf_in_llama_cpp_gives_the_same_greedy_tokens(chat_dir):
    from ctxdistill.gguf_export import export_gguf

    res = export_gguf(chat_dir, "f16")
    assert res["gguf"] == chat_dir / "chat-F16.gguf" and res["tokenizer"].endswith("(pre-tokenizer gpt-2)")
    replies = assert_same_greedy(chat_dir, res["gguf"])
    # The tiny chat model's replies are short and repetitive, but they depend on the prompt; the wide random
    # model below checks attention on many more distinct distributions.
    assert replies[0].startswith("The capital is") and len(set(replies)) >= 2


def test_q8_0_gguf_gives_the_same_replies(chat_dir):
    """Q8_0 rounds weights and activations to 8 bits per 32-value block: replies stay the same on this model,
    with log-probs within 0.15."""
    from ctxdistill.gguf_export import export_gguf

    import gguf

    res = export_gguf(chat_dir, "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(res["gguf"]).tensors}
    assert {v for k, v in types.items() if "norm" not in k} == {"Q8_0"} and types["output_norm.weight"] == "F32"
    assert_same_greedy(chat_dir, res["gguf"], tol=0.15)


def test_transformers_reloads_the_gguf_weights_and_logits(wide_dir):
    """transformers' GGUF loader (`gguf_file=`) undoes the q/k reordering: every weight equals the original
    rounded to float16, bit for bit, and the logits are within float16 rounding of the original's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctxdistill.gguf_export import export_gguf

    res = export_gguf(wide_dir, "f16")
    model, tok = load_hf(wide_dir)
    back = AutoModelForCausalLM.from_pretrained(wide_dir, gguf_file=res["gguf"].name, dtype=torch.float32).eval()
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        want = a[k] if a[k].dim() == 1 else a[k].half().float()  # norms stay float32
        assert torch.equal(b[k], want), k
    text = "Hello   world! It's 2024; naïve café.\n\nWhat is the capital city of Chile?"
    ids = torch.tensor([encode(tok, text)])
    assert AutoTokenizer.from_pretrained(wide_dir, gguf_file=res["gguf"].name)(text, add_special_tokens=False)[
        "input_ids"] == ids[0].tolist()
    with torch.no_grad():
        la, lb = model(ids).logits, back(ids).logits
    assert la.abs().max() > 5  # far from uniform
    assert (la - lb).abs().max() < LOGIT_TOL, (la - lb).abs().max()


def test_wide_random_model_in_llama_cpp_agrees_with_transformers(wide_dir):
    """Grouped-query attention and an untied output layer, in llama.cpp, on several prompts."""
    from ctxdistill.gguf_export import export_gguf, gguf_path

    g = gguf_path(wide_dir, "wide", "f16")
    if not g.exists():
        export_gguf(wide_dir, "f16")
    assert_first_tokens_agree(wide_dir, g)


def test_llama3_rope_scaling_in_llama_cpp(tmp_path, tokenizer_dir):
    """Llama 3.1's rope scaling (llama.cpp's rope_freqs tensor): with head size 16 and an original context of 64,
    its three bands (kept, interpolated, slowed) all occur; llama.cpp agrees with transformers, and the scaling
    changes transformers' own logits, so the check has power."""
    from ctxdistill.gguf_export import export_gguf

    rope = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    d = wide_model(tmp_path / "l3", tokenizer_dir, rope_parameters=rope)
    plain, tok = load_hf(wide_model(tmp_path / "plain", tokenizer_dir))
    scaled, _ = load_hf(d)
    ids = torch.tensor([encode(tok, chat_text(tok, [{"role": "user", "content": PROMPTS[2]}]))])
    with torch.no_grad():
        assert (plain(ids).logits[0, -1] - scaled(ids).logits[0, -1]).abs().max() > 0.5
    res = export_gguf(d, "f16")
    import gguf

    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(res["gguf"]).tensors}
    assert_first_tokens_agree(d, res["gguf"], prompts=PROMPTS[:3])


def test_tokenizer_metadata_is_copied_from_the_base_models_gguf(chat_dir, tmp_path):
    """A model whose base came from a GGUF (the embedded SmolLM2 records it in ctxdistill_source.json) gets that
    GGUF's tokenizer metadata as it is (pre-tokenizer "smollm"), and llama.cpp still gives the same replies."""
    import gguf

    from ctxdistill.core.models import embedded_gguf
    from ctxdistill.gguf_export import export_gguf

    d = Path(shutil.copytree(chat_dir, tmp_path / "from-gguf", ignore=shutil.ignore_patterns("*.gguf")))
    (d / "ctxdistill_source.json").write_text(json.dumps({"gguf": str(embedded_gguf())}))
    res = export_gguf(d, "f16")
    assert res["tokenizer"] == f"copied from {embedded_gguf().name}"
    src, out = gguf.GGUFReader(embedded_gguf()), gguf.GGUFReader(res["gguf"])
    keys = [k for k in src.fields if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in keys and out.fields["tokenizer.ggml.pre"].contents() == "smollm"
    for k in keys:
        assert out.fields[k].contents() == src.fields[k].contents(), k
    assert_same_greedy(d, res["gguf"], prompts=PROMPTS[:3])


LLAMA3_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                                           "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
SMOLLM_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
TRICKY = ("I'LL pay $20.99 for 12345 items!!\n\n\n  Indented  text\twith tabs; naïve café — ünïcödé 😀 "
          "don't STOP'S x2y3 ...")


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm"])
def test_llama_cpp_splits_text_as_the_tokenizer_does(chat_dir, tmp_path, pre):
    """For each pre-tokenizer the export names, llama.cpp tokenises a tricky text as tokenizer.json does: the
    same prompt length, and the same next-token log-probs as when given transformers' token ids (a different
    split would change both)."""
    from transformers import AutoTokenizer

    from ctxdistill.gguf_export import export_gguf

    d = Path(shutil.copytree(chat_dir, tmp_path / pre, ignore=shutil.ignore_patterns("*.gguf")))
    tj = json.loads((d / "tokenizer.json").read_text())
    if pre != "gpt-2":
        tj["pre_tokenizer"] = LLAMA3_PRE if pre == "llama-bpe" else SMOLLM_PRE
        (d / "tokenizer.json").write_text(json.dumps(tj))
    res = export_gguf(d, "f16")
    assert res["tokenizer"].endswith(f"(pre-tokenizer {pre})")
    tok = AutoTokenizer.from_pretrained(d)
    text = chat_text(tok, [{"role": "user", "content": TRICKY + " What is the capital city of Peru?"}])
    ids = encode(tok, text)
    if pre == "llama-bpe":  # the test has power: this split differs from GPT-2's on the text
        assert ids != encode(AutoTokenizer.from_pretrained(chat_dir), text)
    with LlamaCpp(res["gguf"]) as cpp:
        n_text, top_text = cpp.first_token(text)
        n_ids, top_ids = cpp.first_token(ids)
    assert n_text == n_ids == len(ids)
    assert top_text == top_ids


# -- a bake, end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def baked(tmp_path_factory, tiny_chat_model_dir):
    """`ctxdistill bake --gguf` on the tiny chat model (LoRA, merged)."""
    d = tmp_path_factory.mktemp("bake-gguf")
    (d / "prompt.txt").write_text(PROMPT)
    argv = ["bake", "--model", tiny_chat_model_dir, "--system-prompt", d / "prompt.txt", "--out", d / "out",
            "--gguf", *SMALL]
    assert main([str(a) for a in argv]) == 0
    return d / "out"


def test_bake_gguf_runs_the_baked_model_in_llama_cpp(baked):
    """llama.cpp, given the bake's GGUF and no system prompt, replies as the student did in the evaluation
    (greedy, the same held-out inputs), not as the base model did."""
    model = baked / "model"
    g = model / "out-F16.gguf"
    assert g.is_file() and (model / "Modelfile").is_file()
    rows = [json.loads(x) for x in open(baked / "eval/predictions.jsonl")]
    with LlamaCpp(g) as cpp:
        got = [cpp.chat(r["input"], 12)["text"].strip() for r in rows]
    assert got == [r["student"]["prediction"] for r in rows]
    differ = [i for i, r in enumerate(rows) if r["student"]["prediction"] != r["base"]["prediction"]]
    assert differ, "the bake changed no reply; the test would not tell baked from base"
    assert all(got[i] != rows[i]["base"]["prediction"] for i in differ)


def test_bake_writes_the_modelfile_card_and_hf_files_as_users_expect(baked):
    model = baked / "model"
    g = model / "out-F16.gguf"
    text = (model / "Modelfile").read_text()
    assert "FROM ./out-F16.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text and "{{ .Content }}<|im_end|>" in text
    sha = hashlib.sha256(g.read_bytes()).hexdigest()
    card = (model / "README.md").read_text()
    assert "## Run it with llama.cpp or Ollama" in card and f"| `out-F16.gguf` | F16 |" in card and sha in card
    assert "ollama create out -f Modelfile" in card and "llama-cli -m out-F16.gguf" in card
    assert card.index("## Run it with llama.cpp") < card.index("## How it was made")
    # The Hugging Face files: the base model's dtype (float32 for this one), readable by all, no empty step log.
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert json.loads((model / "config.json").read_text())["dtype"] == "float32"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in model.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes
    assert len(set(modes.values())) == 1, modes
    assert not (model / "train_log.jsonl").exists() and (baked / "student/train_log.jsonl").stat().st_size > 0


def test_export_cli_refuses_an_existing_gguf_then_overwrites_and_adds_q8_0(baked, capsys):
    model = baked / "model"
    g = model / "out-F16.gguf"
    before = {p.name: p.stat().st_mtime_ns for p in model.iterdir()}
    assert main(["export", str(baked)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"ctxdistill: error: {g}: exists; pass --overwrite to replace it"]
    assert {p.name: p.stat().st_mtime_ns for p in model.iterdir()} == before  # nothing touched
    assert main(["export", str(baked), "--overwrite"]) == 0
    assert main(["export", str(baked), "--quant", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "out-Q8_0.gguf" in out and "ollama create out -f Modelfile" in out
    assert "FROM ./out-Q8_0.gguf" in (model / "Modelfile").read_text()
    card = (model / "README.md").read_text()
    for name in ("out-F16.gguf", "out-Q8_0.gguf"):
        assert hashlib.sha256((model / name).read_bytes()).hexdigest() in card
    assert card.count("## Run it with llama.cpp or Ollama") == 1
    assert not [p for p in model.iterdir() if ".tmp-" in p.name]


def test_export_hf_in_bfloat16_then_gguf_from_it(baked, capsys):
    """`export --format hf --dtype bfloat16` rewrites model/ in bfloat16 (refused without --overwrite, as it
    replaces a float32 export); the GGUF made from it loads in llama.cpp."""
    from safetensors import safe_open

    from ctxdistill.gguf_export import export_gguf

    assert main(["export", str(baked), "--format", "hf", "--dtype", "bfloat16"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(baked), "--format", "hf", "--dtype", "bfloat16", "--overwrite"]) == 0
    model = baked / "model"
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    assert stat.S_IMODE((model / "model.safetensors").stat().st_mode) == 0o644
    assert not (model / "train_log.jsonl").exists() and (model / "README.md").is_file()
    res = export_gguf(baked, "f16")  # the earlier GGUFs went with the old export
    with LlamaCpp(res["gguf"]) as cpp:
        assert cpp.chat("What is the capital city of France?", 8)["text"]


def test_export_dtype_auto_is_the_base_models(tiny_model_dir, tmp_path):
    from ctxdistill.baking import bake_config
    from ctxdistill.export import export_dtype

    c = bake_config("embedded", "You are a pirate.", out=tmp_path / "a")
    assert export_dtype(c) == "bfloat16"  # HuggingFaceTB/SmolLM2-135M-Instruct is published in bfloat16
    c = bake_config(str(tiny_model_dir), "You are a pirate.", out=tmp_path / "b")
    assert export_dtype(c) == "float32"  # the tiny model's config.json says so
    c = bake_config(str(tiny_model_dir), "You are a pirate.", out=tmp_path / "c", overrides={"export.dtype": "float16"})
    assert export_dtype(c) == "float16"


def test_ollama_template_only_for_a_chat_template_it_reproduces(tokenizer_dir):
    from transformers import AutoTokenizer

    from ctxdistill.gguf_export import _PROBES, chatml, ollama_template

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template, stops = ollama_template(tok)
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default in template and stops == ["<|im_end|>"]
    for p in _PROBES:
        assert chatml(p, default) == tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
    tok.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                         "{{ m['content'] | trim }}<|eot_id|>{% endfor %}")
    assert ollama_template(tok) == (None, ["<|im_end|>"])  # not ChatML: Ollama reads the GGUF's own template


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------------

def _files(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _refused(capsys, root: Path, argv, *needles):
    """One line, exit 2, and no file under `root` created, removed or rewritten."""
    before = _files(root)
    line = one_line_error(capsys, argv, *needles)
    assert _files(root) == before
    return line


def test_unsupported_architecture_is_refused(tmp_path, tiny_model_dir, capsys):
    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "qwen"))
    c = json.loads((d / "config.json").read_text())
    c.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (d / "config.json").write_text(json.dumps(c))
    _refused(capsys, tmp_path, ["export", d], "'Qwen2ForCausalLM' cannot be exported to GGUF; supported: "
             "Llama-architecture models")


def test_bake_with_gguf_refuses_an_unsupported_model_before_any_work(tmp_path, tiny_model_dir, capsys):
    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "mistral"))
    c = json.loads((d / "config.json").read_text())
    c.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (d / "config.json").write_text(json.dumps(c))
    (tmp_path / "p.txt").write_text(PROMPT)
    _refused(capsys, tmp_path, ["bake", "--model", d, "--system-prompt", tmp_path / "p.txt", "--out", tmp_path / "o",
                                "--gguf"], "'MistralForCausalLM' cannot be exported to GGUF")
    assert not (tmp_path / "o").exists()


def test_out_dir_without_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "commands.txt").write_text("ctxdistill bake\n")
    _refused(capsys, tmp_path, ["export", tmp_path / "run"], "no model here")
    _refused(capsys, tmp_path, ["export", tmp_path / "nowhere"], "does not exist")


def test_lora_adapter_without_merge_is_refused(tmp_path, tiny_model_dir, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import warnings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings():  # peft calls a transformers API that v5 marks deprecated
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "run/student")
    _refused(capsys, tmp_path, ["export", tmp_path / "run"], "is a LoRA adapter", "merge it first",
             f"ctxdistill export {tmp_path / 'run'} --format hf")
    _refused(capsys, tmp_path, ["export", tmp_path / "run/student"], "is a LoRA adapter", "merge it first")


def test_weights_beyond_float16_leave_no_file(tmp_path, tiny_model_dir, capsys):
    """A failure while writing (a weight float16 cannot hold) removes the temporary file: nothing half-written."""
    from safetensors.torch import load_file, save_file

    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "big"))
    w = load_file(str(d / "model.safetensors"))
    w["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    _refused(capsys, tmp_path, ["export", d], "beyond float16's range")
    assert not list(d.glob("*.gguf")) and not list(d.glob(".*tmp*"))


def test_flag_mistakes_are_one_line(tmp_path, tiny_model_dir, capsys):
    _refused(capsys, tmp_path, ["export", tiny_model_dir, "--dtype", "bfloat16"], "--dtype is for --format hf")
    (tmp_path / "p.txt").write_text(PROMPT)
    _refused(capsys, tmp_path, ["bake", "--model", tiny_model_dir, "--system-prompt", tmp_path / "p.txt", "--out",
                                tmp_path / "o", "--no-merge", "--gguf"], "export.gguf: needs export.merge = true")
    _refused(capsys, tmp_path, ["export", tmp_path, "--format", "hf"], "no config.toml here")


# -- the embedded model (slow) -----------------------------------------------------------------------------

@pytest.mark.slow
def test_baked_embedded_model_runs_in_llama_cpp(tmp_path):
    """A small bake of the embedded SmolLM2-135M with --gguf: the GGUF carries the embedded GGUF's tokenizer,
    and llama.cpp's greedy replies equal the student's in the evaluation, not the base model's. Both run the bfloat16 export; a reply
    may still differ where the student's top two tokens are closer than float16 rounding (none expected in 12
    tokens, but this is a 30-layer model, not the tiny one)."""
    (tmp_path / "prompt.txt").write_text(PROMPT)
    out = tmp_path / "out"
    argv = ["bake", "--system-prompt", tmp_path / "prompt.txt", "--out", out, "--gguf", *SMALL]
    assert main([str(a) for a in argv]) == 0
    g = out / "model" / "out-F16.gguf"
    assert json.loads((out / "model/config.json").read_text())["dtype"] == "bfloat16"
    import gguf

    from ctxdistill.core.models import embedded_gguf

    assert gguf.GGUFReader(g).fields["tokenizer.ggml.pre"].contents() == "smollm"
    rows = [json.loads(x) for x in open(out / "eval/predictions.jsonl")]
    with LlamaCpp(g, n_ctx=1024) as cpp:
        got = [cpp.chat(r["input"], 12)["text"].strip() for r in rows]
    student, base = [r["student"]["prediction"] for r in rows], [r["base"]["prediction"] for r in rows]
    assert got == student
    assert got != base  # the baked model's replies, not the base model's: the bake changed some, and llama.cpp has them
    assert embedded_gguf().is_file() and os.path.getsize(g) > 200e6
