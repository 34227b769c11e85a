"""Builds the tiny Llama the real-engine tier serves: no hub, no download.

A byte-level BPE tokenizer (vocabulary ``VOCAB_SIZE``) is trained on the Python
standard library's own sources, and a ``LlamaForCausalLM`` gets seeded random
weights. The weights' spread (``initializer_range`` 0.1) makes greedy argmax
decisive, so a split and a colocated run of one prompt give the same tokens.

Run with the engine environment's Python (it needs torch, transformers and
tokenizers, which vLLM brings)::

    python -m bench.engines.tiny_model OUT_DIR

It writes a model folder vLLM loads with ``--model OUT_DIR`` (float32 safetensors,
about 9 MB) and prints its path. Building it takes about 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
SEED = 20261201
# Enough text for a vocabulary of 2048 merges; sorted paths keep the build repeatable.
TRAINING_FILES = 200
TRAINING_BYTES_PER_FILE = 20_000

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": MAX_POSITIONS,
    "initializer_range": 0.1,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def training_text() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())[:TRAINING_FILES]
    return [p.read_text(errors="replace")[:TRAINING_BYTES_PER_FILE] for p in files]


def build_tokenizer(out: Path) -> Any:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MAX_POSITIONS
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer: Any) -> None:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        **{k: v for k, v in MODEL_CONFIG.items() if k not in ("architectures", "model_type")},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    ).save_pretrained(out)


def build(out: Path) -> Path:
    """Builds the model into ``out`` (atomically: a finished folder or none)."""
    if (out / "config.json").exists():
        return out
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=False)
    tokenizer = build_tokenizer(partial)
    build_model(partial, tokenizer)
    (partial / "hetero-router-model.json").write_text(json.dumps(MODEL_CONFIG, indent=1))
    partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model folder to write")
    args = parser.parse_args()
    print(build(args.out))


if __name__ == "__main__":
    main()
