"""The Hugging Face answer backend, end to end on a tiny random Idefics3 (SmolVLM's architecture) built offline.

Nothing is downloaded: the tokenizer is trained here with ``tokenizers``, the model is randomly initialised from a
tiny config, and both are saved to a folder that :class:`HFAnswerBackend` loads like any ``save_pretrained``
folder, with the network blocked.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipdex.exceptions import MissingDependencyError, ModelSpecError
from clipdex.retrieval.answer.backend import GeneratedAnswer, RetrievedItem
from clipdex.retrieval.answer.hf import CAPTION_INSTRUCTION, HF_PREFIX, HFAnswerBackend

IMAGE_SEQ_LEN = 4  # (image_size 32 / patch 8)^2 / scale_factor^2
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
            "<global-img>"]
# SmolVLM's chat template (HuggingFaceTB/SmolVLM-256M-Instruct)
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CORPUS = [
    "User: What landmark is this?", "Assistant: a red tower by the river", "a blue bridge at night",
    "Similar images from the collection, with their captions:", "Query image:", CAPTION_INSTRUCTION,
    "[1] a red square on grey", "[2] a blue circle on white", "the old clock tower", "a green park in spring",
] * 3
QUESTION = "What landmark is this?"


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network for anything in this module: hub offline mode, and any socket connect fails loudly."""
    import huggingface_hub.constants

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", refuse)
        yield


def _tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS, with the special tokens Idefics3's processor uses; like
    Llama's, it prepends BOS to whatever it encodes with special tokens."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Idefics3 with its processor, saved with save_pretrained; returns the folder."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tokenizer = _tokenizer()
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                             max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                                  chat_template=CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<|im_start|>", "<end_of_utterance>", "<image>")}
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=ids["<pad>"], bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<end_of_utterance>"]),
        image_token_id=ids["<image>"], scale_factor=2, pad_token_id=ids["<pad>"])
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    out = tmp_path_factory.mktemp("hf") / "tiny-idefics3"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def backend(tiny_vlm) -> HFAnswerBackend:
    return HFAnswerBackend(str(tiny_vlm), device="cpu")


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[RetrievedItem]:
    """Two retrieved items with real PNG files and captions."""
    folder = tmp_path_factory.mktemp("imgs")
    out = []
    for rank, (color, caption) in enumerate([("red", "a red square on grey"), ("blue", "a blue circle on white")], 1):
        path = folder / f"{color}.png"
        Image.new("RGB", (40, 24), color).save(path)
        out.append(RetrievedItem(rank=rank, id=f"img-{color}", path=str(path), caption=caption, score=0.9 / rank))
    return out


def _query() -> Image.Image:
    return Image.new("RGB", (28, 28), "green")


def _prompt(backend: HFAnswerBackend, inputs) -> str:
    return backend.processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)


def _image_tokens(backend: HFAnswerBackend, inputs) -> int:
    return int((inputs["input_ids"][0] == backend.model.config.image_token_id).sum())


def test_prompt_holds_captions_images_and_question(backend, items):
    inputs = backend.build_inputs(question=QUESTION, image=_query(), items=items)
    prompt = _prompt(backend, inputs)
    assert backend.name == HF_PREFIX + backend.model_id
    # every caption in rank order, then the query image, then the question, in the model's chat format
    positions = [prompt.index(s) for s in ("[1] a red square on grey", "[2] a blue circle on white",
                                           "Query image:", QUESTION, "Assistant:")]
    assert positions == sorted(positions)
    assert prompt.count("<|im_start|>") == 1  # the template's BOS, not doubled by the tokenizer
    assert CAPTION_INSTRUCTION not in prompt
    assert inputs["pixel_values"].shape[:2] == (1, 3)  # two retrieved images + the query image
    assert _image_tokens(backend, inputs) == 3 * IMAGE_SEQ_LEN


def test_generate_answers_from_new_tokens_only(backend, items, monkeypatch):
    seen = {}
    real_generate = backend.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        seen["out"] = real_generate(**kwargs)
        return seen["out"]

    monkeypatch.setattr(backend.model, "generate", spy)
    answer = backend.generate(question=QUESTION, image=_query(), image_vector=None, items=items, max_new_tokens=6)
    assert isinstance(answer, GeneratedAnswer) and isinstance(answer.text, str)
    assert answer.weights is None
    assert seen["pixel_values"].shape[:2] == (1, 3)
    assert (seen["max_new_tokens"], seen["num_beams"], seen["do_sample"]) == (6, 1, False)
    n_prompt = seen["input_ids"].shape[1]
    new = seen["out"][0, n_prompt:]
    assert 0 < len(new) <= 6
    assert answer.text == backend.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    # greedy decoding is deterministic
    again = backend.generate(question=QUESTION, image=_query(), image_vector=None, items=items, max_new_tokens=6)
    assert again.text == answer.text


def test_caption_without_question(backend, items):
    inputs = backend.build_inputs(question=None, image=_query(), items=items)
    prompt = _prompt(backend, inputs)
    assert prompt.index("Query image:") < prompt.index(CAPTION_INSTRUCTION)
    assert prompt.rindex("<image>") < prompt.index(CAPTION_INSTRUCTION)  # the query image is the last image
    answer = backend.generate(question=None, image=_query(), image_vector=None, items=items, max_new_tokens=4,
                              beams=2)
    assert isinstance(answer.text, str) and answer.weights is None
    with pytest.raises(ValueError, match="no image"):
        backend.build_inputs(question=None, image=None, items=items)


def test_items_without_readable_image_are_left_out(backend, items, tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    extra = [RetrievedItem(rank=3, id="no-file", path=None, caption="lost", score=0.2),
             RetrievedItem(rank=4, id="broken", path=str(broken), caption=None, score=0.1)]
    with caplog.at_level(logging.WARNING, logger="clipdex.retrieval.answer.hf"):
        inputs = backend.build_inputs(question=QUESTION, image=None, items=items[:1] + extra)
    prompt = _prompt(backend, inputs)
    assert "[1] a red square on grey" in prompt and "[3]" not in prompt and "[4]" not in prompt
    assert "Query image:" not in prompt
    assert inputs["pixel_values"].shape[:2] == (1, 1)
    assert _image_tokens(backend, inputs) == IMAGE_SEQ_LEN
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "no-file" in warned and str(broken) in warned


def test_missing_folder_raises_model_spec_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelSpecError, match="no-such-model"):
        HFAnswerBackend(str(missing))


def test_text_only_model_raises_model_spec_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "text-only"
    tokenizer = _tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelSpecError, match="text-only"):
        HFAnswerBackend(str(folder))


def test_missing_transformers_says_what_to_install(monkeypatch, tiny_vlm):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "clipdex\[hf\]"'):
        HFAnswerBackend(str(tiny_vlm))

