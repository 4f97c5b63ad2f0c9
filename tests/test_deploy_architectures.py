"""GGUF export beyond Llama: tiny random-weight Gemma, Qwen2 and Phi-3 models (built from their configs with
transformers, tokenizers trained here on the sample data, nothing downloaded) go through llama.cpp's own
convert_hf_to_gguf.py as 06 obtains it (from the llama-cpp-python sdist), then llama.cpp must load each
file, tokenize like the HF tokenizer and compute the same next-token logits as transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llamaduo_nb import deploy, student

ROOT = Path(__file__).resolve().parent.parent
PHI3_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]


def _sample_lines() -> list[str]:
    lines = []
    for line in (ROOT / "data" / "sample_coverage.jsonl").read_text().splitlines():
        if line:
            for message in json.loads(line)["messages"]:
                lines += [text for text in message["content"].split("\n") if text.strip()]
    return lines


def _spm_tokenizer(folder: Path, tokenizer_class: str, **ids):
    """A 512-piece SentencePiece BPE model with byte fallback, trained on the sample data, as an HF tokenizer."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sample_lines()),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        minloglevel=2,
        **ids,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    return AutoTokenizer.from_pretrained(folder)


def _bpe_tokenizer(folder: Path):
    """A byte-level BPE (GPT-2 pre-tokenization) trained on the sample data, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_sample_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )


def build_tiny(kind: str, folder: Path) -> Path:
    import torch
    import transformers as tf

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if kind == "gemma":
        tokenizer = _spm_tokenizer(
            folder, "GemmaTokenizer", add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3
        )
        config = tf.GemmaConfig(
            **size,
            vocab_size=512,
            head_dim=16,
            num_key_value_heads=1,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
        model_class = tf.GemmaForCausalLM
    elif kind == "phi3":
        tokenizer = _spm_tokenizer(folder, "LlamaTokenizer", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        tokenizer.add_special_tokens({"additional_special_tokens": PHI3_SPECIALS})  # as Phi-3's ids 32000+
        config = tf.Phi3Config(
            **size,
            vocab_size=512 + len(PHI3_SPECIALS),
            num_key_value_heads=4,
            pad_token_id=None,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=512,
            original_max_position_embeddings=512,
        )
        model_class = tf.Phi3ForCausalLM
    else:
        folder.mkdir(parents=True)
        tokenizer = _bpe_tokenizer(folder)
        config = tf.Qwen2Config(
            **size, vocab_size=len(tokenizer), num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=2
        )
        model_class = tf.Qwen2ForCausalLM
    for key, value in dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # random weights big enough that a wrong layout changes the logits
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gemma", "qwen2", "phi3"])
def test_llama_cpp_converter_exports_loads_and_agrees_with_transformers(kind, tmp_path):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny(kind, tmp_path / f"tiny-{kind}")
    script = deploy.ensure_llama_cpp_converter(quiet=True)
    # A freshly trained BPE has no entry in llama.cpp's table of known pre-tokenizers (it hashes the real
    # vocabularies); it uses GPT-2's pre-tokenization, which deploy.gguf_tokenizer_pre names.
    export = deploy.convert_with_llama_cpp(
        script, folder, tmp_path / f"{kind}.gguf", "f32", tokenizer_pre="gpt-2" if kind == "qwen2" else None
    )
    assert (
        export.path.is_file()
        and student.gguf_string(export.path, "general.architecture")
        == {
            "gemma": "gemma",
            "qwen2": "qwen2",
            "phi3": "phi3",
        }[kind]
    )
    check = student.check_gguf_tokenizer(export.path, folder)
    if kind == "phi3":
        # Measured: on leading spaces the HF fast tokenizer transformers converts from this SentencePiece
        # model splits differently from the model itself; llama.cpp agrees with sentencepiece there.
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        for mismatch in check["mismatches"]:
            assert mismatch["text"].startswith(" "), mismatch
            assert mismatch["llama_cpp"] == sp.encode(mismatch["text"])[:40]
        assert len(check["mismatches"]) <= 1
    else:
        assert check["ok"], check["mismatches"]

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("Summarize the text: the cat sat on the mat.", add_special_tokens=True)["input_ids"]
    llm = llama_cpp.Llama(str(export.path), n_ctx=128, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        served = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
    assert (served.argmax(-1) == expected.argmax(-1)).all()
    assert np.abs(served - expected).max() < 0.02 * np.abs(expected).max()


@pytest.mark.slow
def test_f16_then_k_quant_of_a_non_llama_student(tmp_path):
    folder = build_tiny("qwen2", tmp_path / "tiny-qwen2")
    script = deploy.ensure_llama_cpp_converter(quiet=True)
    f16 = deploy.convert_with_llama_cpp(script, folder, tmp_path / "f16.gguf", "f16", tokenizer_pre="gpt-2")
    q4 = deploy.quantize_gguf(f16.path, tmp_path / "q4_k_m.gguf", "q4_k_m")
    assert q4.bytes < f16.bytes and student.check_gguf_tokenizer(q4.path, folder)["ok"]
