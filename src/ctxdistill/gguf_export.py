"""GGUF export: the merged model in `<out>/model/` as one file for llama.cpp, Ollama and LM Studio.

    export_gguf("runs/bake")   # -> runs/bake/model/bake-F16.gguf and runs/bake/model/Modelfile

Llama-architecture models only (model_type "llama": SmolLM/SmolLM2, Llama 3), with a byte-level BPE
tokenizer. For that architecture a converter is short, written here on gguf-py's pieces (GGUFWriter, the
tensor-name map, the quantiser) without llama.cpp's convert script:
- every tensor keeps its shape under its GGUF name, except q and k, whose rows are reordered for
  llama.cpp's rotary embedding (`rope_permute`); 1-D tensors (the norms) stay float32, as llama.cpp expects;
- the hyper-parameters llama.cpp reads for arch "llama" (context and embedding length, blocks, heads, kv
  heads, head size, rope base and scaling, RMS-norm epsilon, vocabulary size);
- the tokenizer: where the base model came from a GGUF (the embedded SmolLM2), its `tokenizer.*` metadata
  is copied as it is; otherwise it is built from tokenizer.json, and the pre-tokenizer is named only when
  tokenizer.json's is one llama.cpp implements identically (`PRE_TOKENIZERS`);
- an Ollama Modelfile beside it: FROM the file, the chat template in Ollama's Go-template syntax where the
  model's template is one we can state exactly (ChatML, checked by rendering), and its stop tokens.

Nothing is half-written: every check runs first, and the file is written under a temporary name, then renamed.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ctxdistill.config import GGUF_TYPES
from ctxdistill.core.errors import UserError
from ctxdistill.core.progress import log

MODEL_DIR = "model"
MODELFILE = "Modelfile"
INDEX = "ctxdistill_gguf.json"  # in the model directory: what each GGUF was made from, and its sha256
SUPPORTED = ("Llama-architecture models (model_type 'llama', LlamaForCausalLM: SmolLM/SmolLM2, Llama 3) "
             "with a byte-level BPE tokenizer")
FILE_TYPE = {"f16": "F16", "q8_0": "Q8_0"}  # --quant -> the GGML type, also the file name's suffix
F16_MAX = 65504.0

# tokenizer.json pre-tokenizers that llama.cpp implements with the same splits, by the name it reads from
# tokenizer.ggml.pre. Compared as data (the steps and their settings), so a tokenizer not listed here is refused
# rather than written with a pre-tokenizer that would split text differently from the one the model learnt.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                 "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],  # GPT-2's regex inside ByteLevel (also what transformers builds from SmolLM2's GGUF)
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],  # the Hub's SmolLM/SmolLM2
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                  {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}],  # Llama 3
}


# -- where the model is, and whether it can be converted ----------------------------------------------------

def model_dir_of(target: str | os.PathLike) -> Path:
    """The merged model to convert: `<target>/model/` (a bake's, or a run's with export.merge), or `target`
    itself when it is a Hugging Face model directory. A LoRA adapter, or no model at all, is a UserError."""
    t = Path(target).expanduser()
    if not t.is_dir():
        raise UserError(f"{t}: {'is not a directory' if t.exists() else 'does not exist'}; give a bake's output "
                        "directory or a Hugging Face model directory")
    adapter = next((d for d in (t, t / "student") if (d / "adapter_config.json").is_file()), None)
    if (t / MODEL_DIR / "config.json").is_file():
        return t / MODEL_DIR
    if adapter is not None:
        raise UserError(f"{adapter}: is a LoRA adapter, and GGUF export needs full weights; merge it first "
                        f"(`ctxdistill export {t if adapter != t else '<the run directory>'} --format hf` writes the "
                        "merged model to <out>/model/)")
    if (t / "config.json").is_file():
        return t
    if (t / "student" / "config.json").is_file():
        raise UserError(f"{t}: no model in {t / MODEL_DIR}; write it first with `ctxdistill export {t} --format hf`")
    raise UserError(f"{t}: no model here (expected {t / MODEL_DIR}/ from a bake, or a Hugging Face model directory "
                    "with config.json)")


def read_hparams(model_dir: Path) -> dict:
    """config.json's hyper-parameters, checked to be a Llama this converter handles (else a UserError)."""
    try:
        c = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{model_dir / 'config.json'}: unreadable ({e})") from None
    archs = c.get("architectures") or []
    if c.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise UserError(f"{model_dir}: architecture {archs[0] if archs else c.get('model_type')!r} cannot be exported "
                        f"to GGUF; supported: {SUPPORTED}")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise UserError(f"{model_dir}: {key} = true is not supported by the GGUF export (Llama models without "
                            "biases only)")
    heads = c["num_attention_heads"]
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})  # transformers 5, and 4's form
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"{model_dir}: rope scaling {rope_type!r} is not supported by the GGUF export (default, "
                        "linear and llama3 are)")
    return {
        "n_layer": c["num_hidden_layers"], "n_embd": c["hidden_size"], "n_ff": c["intermediate_size"],
        "n_head": heads, "n_head_kv": c.get("num_key_value_heads") or heads,
        "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
        "n_ctx": c.get("max_position_embeddings") or 2048, "eps": c.get("rms_norm_eps", 1e-6),
        "theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), "rope": rope, "rope_type": rope_type,
        "n_vocab": c["vocab_size"], "tied": bool(c.get("tie_word_embeddings", False)),
    }


def check_model(name: str) -> None:
    """Before a bake with export.gguf does any work: the base model (a local or the embedded one; a Hub id is
    checked at export) is a Llama whose tokenizer the export can write."""
    from ctxdistill.core import models

    path = Path(models.resolve(name))
    if not path.is_dir():
        return
    read_hparams(path)
    if source_gguf(path) is None:
        _hf_tokens(path)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or shards with an index)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{model_dir}: no model.safetensors (GGUF export reads safetensors weights only)")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


# -- tensors -------------------------------------------------------------------------------------------------

def rope_permute(w, n_head: int):
    """Reorder the rows of a q or k projection from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face's Llama rotates dimension i of a head together with dimension i + d/2 (`rotate_half`);
    llama.cpp's "llama" arch rotates adjacent pairs (2i, 2i + 1). Both rotate pair i by the same angle, so
    moving row i of each head to 2i and row i + d/2 to 2i + 1 gives the same attention scores.
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hp: dict):
    """Per-frequency divisors for Llama 3.1's rope scaling (llama.cpp reads them as the tensor rope_freqs):
    long wavelengths are slowed by `factor`, short ones kept, and the band between interpolated, as in
    transformers' llama3 rope initialisation."""
    import numpy as np

    r, d = hp["rope"], hp["head_dim"]
    factor, lo, hi = r["factor"], r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    old_ctx = r["original_max_position_embeddings"]
    wavelen = 2 * math.pi * hp["theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    out = np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor,
                                                         1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def tensor_plan(model_dir: Path, hp: dict, quant: str) -> list[tuple[str, str | None, tuple, object]]:
    """[(GGUF name, HF name or None for a computed tensor, shape, GGML type)] in writing order; refuses a
    tensor it cannot name."""
    import gguf
    from safetensors import safe_open

    files = weight_files(model_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layer"])
    qtype = gguf.GGMLQuantizationType[FILE_TYPE[quant]]
    plan = []
    for hf in sorted(files, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]):
        if "rotary_emb" in hf or (hf == "lm_head.weight" and hp["tied"]):
            continue  # recomputed by llama.cpp; the tied output layer is token_embd itself
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{model_dir}: tensor {hf!r} has no GGUF name for the llama architecture")
        with safe_open(str(files[hf]), framework="pt") as f:
            shape = tuple(f.get_slice(hf).get_shape())
        if len(shape) == 1:
            t = gguf.GGMLQuantizationType.F32
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
            t = gguf.GGMLQuantizationType.F16  # Q8_0 packs rows in blocks of 32
        else:
            t = qtype
        plan.append((name, hf, shape, t))
    if not hp["tied"] and "lm_head.weight" not in files:
        raise UserError(f"{model_dir}: tie_word_embeddings is false but there is no lm_head.weight")
    if hp["rope_type"] == "llama3":
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, (hp["head_dim"] // 2,),
                     gguf.GGMLQuantizationType.F32))
    return plan


def _tensor_data(model_dir: Path, files: dict, hp: dict, hf: str | None, t):
    """One tensor as the numpy array GGUFWriter writes: permuted where needed, in type `t`."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    if hf is None:
        return llama3_rope_factors(hp)
    with safe_open(str(files[hf]), framework="pt") as f:
        w = f.get_tensor(hf).to(torch.float32).numpy()  # bf16 has no numpy type: widen first
    if hf.endswith("self_attn.q_proj.weight"):
        w = rope_permute(w, hp["n_head"])
    elif hf.endswith("self_attn.k_proj.weight"):
        w = rope_permute(w, hp["n_head_kv"])
    if t == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    peak = float(np.abs(w).max()) if w.size else 0.0
    if not math.isfinite(peak) or peak > F16_MAX:
        raise UserError(f"{model_dir}: tensor {hf} holds {peak:.3g}, beyond float16's range; it cannot be written "
                        f"as {t.name}")
    if t == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), t)


# -- tokenizer -----------------------------------------------------------------------------------------------

def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF the base model was converted from, when there is one: the embedded SmolLM2's, recorded by
    `models.embedded_checkpoint` (ctxdistill_source.json) in the base's directory and, through the base model's
    name, by the export (ctxdistill_config.json's "base_model")."""
    from ctxdistill.config import EMBEDDED
    from ctxdistill.core import models

    def recorded(d: Path) -> Path | None:
        src = d / "ctxdistill_source.json"
        if src.is_file():
            p = Path(json.loads(src.read_text()).get("gguf", ""))
            return p if p.is_file() else None
        return None

    if (found := recorded(model_dir)) is not None:
        return found
    info = model_dir / "ctxdistill_config.json"
    base = json.loads(info.read_text()).get("base_model") if info.is_file() else None
    if base == EMBEDDED:
        return models.embedded_gguf()
    if base and Path(base).expanduser().is_dir():
        return recorded(Path(base).expanduser())
    return None


def _hf_tokens(model_dir: Path) -> tuple[dict, list[str], list[int], list[str], str]:
    """From tokenizer.json: (the parsed file, tokens by id, their GGUF token types, merges, pre-tokenizer
    name); a tokenizer llama.cpp would not split and merge the same way is a UserError."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    j = json.loads(path.read_text(encoding="utf-8"))
    model = j.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (j.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{model_dir}: the tokenizer is not a byte-level BPE (it is {model.get('type')!r}"
                        f"{', with byte fallback: a sentencepiece-style Llama 1/2 tokenizer' if model.get('byte_fallback') else ''}); "
                        f"supported: {SUPPORTED}")
    pre = pre_tokenizer_name(j.get("pre_tokenizer"), j.get("normalizer"))
    if pre is None:
        raise UserError(f"{model_dir}: tokenizer.json's pre-tokenizer ({json.dumps(j.get('pre_tokenizer'))[:120]}) is "
                        f"not one llama.cpp is known to split identically ({', '.join(PRE_TOKENIZERS)})")
    by_id = {i: t for t, i in model["vocab"].items()}
    kind = {}
    for a in j.get("added_tokens") or []:
        by_id[a["id"]] = a["content"]
        kind[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [int(kind.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return j, tokens, types, merges, pre


def pre_tokenizer_name(pre: dict | None, normalizer: dict | None) -> str | None:
    """llama.cpp's name for tokenizer.json's pre-tokenizer (`PRE_TOKENIZERS`), or None when it has none."""
    if normalizer or not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    for name, want in PRE_TOKENIZERS.items():
        if len(steps) == len(want) and all(all(s.get(k) == v for k, v in w.items()) for s, w in zip(steps, want)):
            return name
    return None


def write_tokenizer(writer, model_dir: Path, tok, n_vocab: int) -> str:
    """The tokenizer.* metadata: copied from the base model's GGUF when it has one and its tokens are the
    model's, else built from tokenizer.json. Returns where it came from, for the log."""
    import gguf

    hf_tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    src = source_gguf(model_dir)
    if src is not None:
        reader = gguf.GGUFReader(src)
        fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        same = lambda key, value: key in fields and fields[key].contents() == value  # noqa: E731
        if same("tokenizer.ggml.model", "gpt2") and same("tokenizer.ggml.tokens", hf_tokens) \
                and same("tokenizer.ggml.eos_token_id", tok.eos_token_id):
            for key, f in fields.items():
                sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
            return f"copied from {src.name}"
        log(f"gguf: {src.name}'s tokenizer differs from {model_dir}'s; building it from tokenizer.json instead")
    _, tokens, types, merges, pre = _hf_tokens(model_dir)
    if tokens != hf_tokens[:len(tokens)] or len(tokens) != len(hf_tokens):
        raise UserError(f"{model_dir}: tokenizer.json and the loaded tokenizer disagree on the vocabulary")
    if len(tokens) > n_vocab:
        raise UserError(f"{model_dir}: the tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]  # embedding rows no token uses
    types += [int(gguf.TokenType.UNUSED)] * (n_vocab - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id")
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    probe = tok("a", add_special_tokens=True)["input_ids"]  # what the tokenizer adds around text by itself
    writer.add_add_bos_token(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id])
    writer.add_add_eos_token(tok.eos_token_id is not None and len(probe) > 1 and probe[-1:] == [tok.eos_token_id])
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
    return f"built from tokenizer.json (pre-tokenizer {pre})"


# -- Ollama --------------------------------------------------------------------------------------------------

_PROBES = [  # conversations the chat template is rendered on, to recognise it exactly
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What now?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}],
]


def chatml(messages: list[dict], default_system: str | None) -> str:
    """ChatML as `ollama_template` writes it for Ollama, in Python: the reference the model's own chat template
    must equal before the Go template is written."""
    out = ""
    if default_system is not None and messages[0]["role"] != "system":
        out += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    out += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + "<|im_start|>assistant\n"


def ollama_template(tok) -> tuple[str | None, list[str]]:
    """(TEMPLATE for the Modelfile in Ollama's Go-template syntax, or None, and the stop strings).

    The template is written only where the model's chat template renders exactly as `chatml` does on
    `_PROBES` (SmolLM2's, with its default system prompt when none is given). For another template the
    Modelfile has no TEMPLATE line, and Ollama takes the template from the GGUF's tokenizer.chat_template
    when it recognises it."""
    stops = [t for t in dict.fromkeys([tok.eos_token]) if t]
    if not tok.chat_template:
        return None, stops
    render = lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # noqa: E731
    try:
        first = render(_PROBES[0])
    except Exception:  # a template that needs other roles or arguments: not ChatML
        return None, stops
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", first, re.S)
    default = m.group(1) if m else None
    try:
        same = all(render(p) == chatml(p, default) for p in _PROBES)
    except Exception:
        same = False
    if not same or (default and ("{{" in default or '"""' in default)):
        return None, stops
    first_turn = ("{{- if and (eq $i 0) (ne .Role \"system\") }}<|im_start|>system\n" + default + "<|im_end|>\n{{ end }}"
                  if default is not None else "")
    template = ("{{- range $i, $_ := .Messages }}\n" + first_turn
                + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
    return template, list(dict.fromkeys(["<|im_end|>", *stops]))


def modelfile_text(gguf_name: str, tok) -> str:
    template, stops = ollama_template(tok)
    lines = ["# Ollama: `ollama create NAME -f Modelfile` in this directory, then `ollama run NAME`.",
             f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# No TEMPLATE: Ollama takes the chat template from the GGUF (tokenizer.chat_template).")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def ollama_name(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"


# -- the export ----------------------------------------------------------------------------------------------

def gguf_path(model_dir: Path, name: str, quant: str) -> Path:
    return model_dir / f"{name}-{FILE_TYPE[quant]}.gguf"


def default_name(target: str | os.PathLike) -> str:
    """The run's directory name for a bake's `<out>/model/`, else the model directory's own name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(target).expanduser().resolve().name).strip("-.") or "model"


def read_index(model_dir: Path) -> dict:
    p = Path(model_dir) / INDEX
    return json.loads(p.read_text()) if p.is_file() else {}


def up_to_date(model_dir: Path, name: str, quant: str) -> bool:
    """The GGUF for `quant` is there and was made from the model directory as it is now."""
    from ctxdistill.core.models import fingerprint

    entry = read_index(model_dir).get(gguf_path(model_dir, name, quant).name)
    return bool(entry) and gguf_path(model_dir, name, quant).is_file() \
        and entry.get("from") == fingerprint(str(model_dir), full=True)


def export_gguf(target: str | os.PathLike, quant: str = "f16", *, overwrite: bool = False,
                name: str | None = None) -> dict:
    """Convert the merged model of `target` (see `model_dir_of`) to `<model dir>/<name>-<TYPE>.gguf` and write
    the Ollama Modelfile beside it. Returns {"gguf", "modelfile", "sha256", "bytes", "quant", "tokenizer"}.

    An existing GGUF of the same name is refused unless `overwrite`. Every check (architecture, tensors,
    tokenizer) runs before anything is written.
    """
    import gguf
    import numpy as np

    from ctxdistill.core.files import normal_file_mode, sha256_file, write_atomic
    from ctxdistill.core.models import fingerprint, load_tokenizer

    if quant not in GGUF_TYPES:
        raise UserError(f"--quant: {quant!r} is not one of {', '.join(GGUF_TYPES)}")
    model_dir = model_dir_of(target)
    hp = read_hparams(model_dir)
    plan = tensor_plan(model_dir, hp, quant)
    name = name or default_name(target)
    dest = gguf_path(model_dir, name, quant)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest}: exists; pass --overwrite to replace it")
    tok = load_tokenizer(str(model_dir))
    files = weight_files(model_dir)

    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_context_length(hp["n_ctx"])
        w.add_embedding_length(hp["n_embd"])
        w.add_block_count(hp["n_layer"])
        w.add_feed_forward_length(hp["n_ff"])
        w.add_head_count(hp["n_head"])
        w.add_head_count_kv(hp["n_head_kv"])
        w.add_rope_dimension_count(hp["head_dim"])
        if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:  # llama.cpp assumes n_embd / n_head otherwise
            w.add_key_length(hp["head_dim"])
            w.add_value_length(hp["head_dim"])
        w.add_rope_freq_base(hp["theta"])
        if hp["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(hp["rope"]["factor"]))
        w.add_layer_norm_rms_eps(float(hp["eps"]))
        w.add_vocab_size(hp["n_vocab"])
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer_from = write_tokenizer(w, model_dir, tok, hp["n_vocab"])
        # Tensor infos first, then the data one tensor at a time: memory stays at one tensor, not the model.
        for gname, _, shape, t in plan:
            if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dt = np.dtype(np.float32 if t == gguf.GGMLQuantizationType.F32 else np.float16)
                w.add_tensor_info(gname, shape, dt, math.prod(shape) * dt.itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, t)
                w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, hf, _, t in plan:
            w.write_tensor_data(_tensor_data(model_dir, files, hp, hf, t))
        w.close()
        os.chmod(tmp, normal_file_mode())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha = sha256_file(dest)
    write_atomic(model_dir / MODELFILE, modelfile_text(dest.name, tok))
    index = read_index(model_dir)
    index[dest.name] = {"quant": FILE_TYPE[quant], "sha256": sha, "bytes": dest.stat().st_size,
                        "from": fingerprint(str(model_dir), full=True), "modelfile": MODELFILE,
                        "ollama_name": ollama_name(name)}
    write_atomic(model_dir / INDEX, json.dumps(index, indent=1) + "\n")
    log(f"gguf: wrote {dest} ({FILE_TYPE[quant]}, {dest.stat().st_size / 1e6:.1f} MB; tokenizer {tokenizer_from}) "
        f"and {model_dir / MODELFILE}")
    return {"gguf": dest, "modelfile": model_dir / MODELFILE, "sha256": sha, "bytes": dest.stat().st_size,
            "quant": FILE_TYPE[quant], "tokenizer": tokenizer_from}
