"""The built-in demo: country -> capital on the embedded SmolLM2-135M-Instruct.

With context the model answers "What is the capital city of X?" in a sentence ("The capital city of
France is Paris."), from which f extracts the city. Without context, given only "France", it does not
answer with a capital. Distillation teaches the student to answer the bare country name with the city.
Inputs and references: Super-NaturalInstructions task1146 (shipped in ctxdistill/data), 60 held out.
"""

from __future__ import annotations

from pathlib import Path

from ctxdistill.config import (Config, DataConfig, EvalConfig, ExtractorConfig, GenerationConfig, ModelConfig,
                               TaskConfig, TeachConfig, TrainConfig)

DATA = Path(__file__).parent / "data" / "task1146_country_capital.json"


def demo_config(out_dir: str = "runs/demo", model: str = "embedded") -> Config:
    return Config(
        out_dir=out_dir,
        model=ModelConfig(name=model),
        task=TaskConfig(
            name="country_capital",
            teacher="What is the capital city of {input}?",
            teacher_prefill="The capital city of {input} is",
            student="{input}",
            # f: the words after "is" (skipping "called"/"known as"), up to the end of the sentence.
            extractor=ExtractorConfig(kind="regex",
                                      pattern=r"\bis\s+(?:(?:called|known as|named|located in)\s+)?([^.,;:()\n]+)"),
            scorer="exact",
        ),
        data=DataConfig(superni=str(DATA), n_eval=60, seed=0),
        generation=GenerationConfig(temperature=0.0, samples_per_input=1, max_new_tokens=12),
        teach=TeachConfig(top_k=20, batch_size=64),  # 64 rows per decode step: 24.1 s -> 15.9 s for 128 inputs
        # LoRA at lr 1e-3 beat full fine-tuning (3e-5, 1e-5, 5e-5) and hard labels in benchmarks/demo_sweep.py;
        # see docs/results.md for the measured table.
        train=TrainConfig(method="lora", loss="forward_kl", lr=1e-3, epochs=3, batch_size=8, lora_r=16, lora_alpha=32),
        eval=EvalConfig(batch_size=20, max_new_tokens=12),
    )
