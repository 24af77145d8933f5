"""Regenerates the built-in tokenizer: `python -m atlas_jax.data.build_tokenizer [OUT_DIR]`.

A byte-level BPE of exactly VOCAB_SIZE ids trained on the synthetic teaching corpus, so
the `tiny` model preset needs no download. Byte-level means any text still encodes.
Digits are split one per token: a tiny model learns arithmetic from single digits far
more easily than from arbitrary merged number chunks. The output is deterministic: the
corpus is generated from a fixed seed and the BPE trainer breaks ties by pair order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from atlas_jax.config import DataConfig
from atlas_jax.data import synthetic
from atlas_jax.data.formatting import teaching_messages

VOCAB_SIZE = 1024
PAD, EOT, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, EOT, IM_START, IM_END)  # ids 0..3; pad = 0 matches generate()'s default
CORPUS_SEED, CORPUS_SIZE = 20240, 4000
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


# Words the RCL prompts and student replies use beyond the synthetic traces, so those
# texts do not fall back to single bytes.
EXTRA_TEXT = (
    "Solve the problem step by step and put your final answer in a box. "
    "Read the guidance from your teacher before you answer. "
    "Explain briefly how you would approach this problem, without solving it. "
    "Think about what the question asks, which numbers matter, and which operation to use. "
    "Write the reasoning, then check the result once more. The final answer is "
    "Question: Answer: Guidance: Approach: Solution: Reasoning: Therefore, so, because, "
    "each, total, equal, groups, share, remaining, difference, sum, product, quotient, "
    "percent, price, dollars, hours, minutes, days, weeks, students, teacher, class, "
    "twice, half, times, more than, less than, fewer, altogether, how much, how many."
)


def corpus() -> list[str]:
    """Message texts of synthetic teaching traces and RL prompts, plus the role names."""
    cfg = DataConfig()
    texts = ["system", "user", "assistant", "\\boxed{}", "<solution></solution>", "<teaching></teaching>"]
    texts += [EXTRA_TEXT] * 20
    for i in range(CORPUS_SIZE):
        texts.extend(m["content"] for m in teaching_messages(synthetic.sft_record(i, CORPUS_SEED), cfg))
    return texts


def train() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # A small corpus may run out of merges before VOCAB_SIZE; reserved ids fill the rest
    # so the embedding table size is exactly the model preset's vocab_size.
    missing = VOCAB_SIZE - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"built tokenizer has {tok.get_vocab_size()} ids, expected {VOCAB_SIZE}")
    return tok


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    train().save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [EOT, IM_START],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else ASSET_DIR)
    print(f"wrote {ASSET_DIR if len(sys.argv) == 1 else sys.argv[1]}")
