"""Incremental detokenization: streamed pieces, stop strings and blocked content against whole decodings.

Four real tokenizers: the demo's byte-level BPE, SmolLM2's (when its repository was built), and two trained
here offline with ``tokenizers``: a byte-level BPE whose merges split CJK characters and emoji across tokens,
and a SentencePiece-like one (``▁`` spaces, leading space stripped, byte fallback).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from peftserve.blocked_content import BlockedContent, pattern_reach
from peftserve.errors import BlockedContentError
from peftserve.text_stream import TextStream
from tools import smollm2_assets

CORPUS = [
    "the cat looks at the river, café naïve ünïcödé straße",
    "中文 字符 日本語 한국어 🙂 🚀 👩‍💻 emoji and text",
    "hello world, the dog writes about the weather\n",
]
ALPHABET = [*"abcdefghij  ,.\n", "é", "ß", "中", "文", "語", "🙂", "🚀", "👩\u200d💻", "€"]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """Few merges, so many tokens hold part of a multi-byte character."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<|end|>"], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end|>")


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama-style: ``▁`` for spaces, the decoded text's first space stripped, unknown characters as bytes."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=140, special_tokens=["<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS[:1] * 10, trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>"
    )


def smollm2():
    directory = smollm2_assets.DEFAULT_REPOSITORY / "peft_llm" / "base_model"
    if not (directory / "tokenizer.json").is_file():
        pytest.skip("the SmolLM2 repository is not built (make smollm2)")
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module", params=["demo", "byte_level_bpe", "sentencepiece_like", "smollm2"])
def tokenizer(request: pytest.FixtureRequest, model_dir: Path):
    if request.param == "demo":
        return AutoTokenizer.from_pretrained(model_dir / "base_model")
    return {"byte_level_bpe": byte_level_bpe, "sentencepiece_like": sentencepiece_like, "smollm2": smollm2}[
        request.param
    ]()


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def cut_at_first_stop(text: str, stops: Sequence[str]) -> str:
    found = [text.find(stop) for stop in stops if stop in text]
    return text[: min(found)] if found else text


def stream(tokenizer, ids: Sequence[int], stops: Sequence[str] = (), blocked: BlockedContent | None = None):
    """Feed the ids one token more per step, as the batcher does; (pieces, final answer, step it stopped)."""
    text = TextStream(tokenizer, stops, blocked)
    pieces, stopped_at = [], None
    for count in range(1, len(ids) + 1):
        if text.reached_stop(ids[:count]):
            stopped_at = count
            break  # the runner ends the row at once
        pieces.append(text.update(ids[:count]))
    piece, answer = text.finish(ids[: stopped_at or len(ids)])
    return [*pieces, piece], answer, stopped_at


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def random_answer(tokenizer, rng: random.Random) -> list[int]:
    """Text encoded piece by piece (so not always the canonical tokens), with special tokens in between; for
    byte-level tokenizers also any token at all, including ones that leave UTF-8 characters incomplete."""
    if rng.random() < 0.5 and "Ġ" in tokenizer.get_vocab():  # byte-level: every id sequence is a byte string
        return [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
    ids: list[int] = []
    for _ in range(rng.randrange(1, 8)):
        ids += tokenizer.encode(random_text(rng, rng.randrange(1, 12)), add_special_tokens=False)
        if rng.random() < 0.2:
            ids.append(rng.choice(tokenizer.all_special_ids))
    return ids


def old_stop_step(tokenizer, ids: Sequence[int], stops: Sequence[str]) -> int | None:
    """The step at which the former whole-text check ended the row."""
    return next((n for n in range(1, len(ids) + 1) if any(s in decode(tokenizer, ids[:n]) for s in stops)), None)


def test_pieces_add_up_to_the_whole_decoding_cut_at_the_first_stop(tokenizer) -> None:
    rng = random.Random(14)
    for _ in range(150):
        ids = random_answer(tokenizer, rng)
        full = decode(tokenizer, ids)
        stops: list[str] = []
        for _ in range(rng.randrange(0, 3)):  # substrings of the answer (across token boundaries), or not in it
            start = rng.randrange(len(full) + 1)
            stop = full[start : start + rng.randrange(1, 6)].replace("\ufffd", "") or random_text(rng, 3)
            stops.append(stop)
        pieces, answer, stopped_at = stream(tokenizer, ids, stops)
        assert answer == cut_at_first_stop(decode(tokenizer, ids[: stopped_at or len(ids)]), stops)
        assert "".join(pieces) == answer
        assert stopped_at == old_stop_step(tokenizer, ids, stops)  # the row ends at the same token as before
        assert all("\ufffd" not in piece for piece in pieces[:-1]) or "\ufffd" in answer


def test_a_character_split_across_tokens_is_sent_whole(tokenizer) -> None:
    ids = tokenizer.encode("ok 🙂 中文 €", add_special_tokens=False)
    text = TextStream(tokenizer)
    pieces = [text.update(ids[:count]) for count in range(1, len(ids) + 1)]
    pieces.append(text.finish(ids)[0])
    assert "".join(pieces) == decode(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert len([piece for piece in pieces if piece]) > 1  # streamed, not all at the end


def test_a_stop_string_spanning_tokens_ends_the_row_and_is_not_sent(tokenizer) -> None:
    ids = tokenizer.encode("the cat looks at the river, café 中文 and more", add_special_tokens=False)
    pieces, answer, stopped_at = stream(tokenizer, ids, ["zzz", "river, caf"])
    assert answer == "".join(pieces) == cut_at_first_stop(decode(tokenizer, ids), ["river, caf"])
    assert "river" not in answer and answer.endswith("at the ")
    assert stopped_at == old_stop_step(tokenizer, ids, ["river, caf"]) < len(ids)


class CountingTokenizer:
    """A tokenizer that records how many ids each ``decode`` call gets."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded: list[int] = []

    def decode(self, ids, **kwargs) -> str:
        self.decoded.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_each_step_decodes_a_few_recent_tokens_only(tokenizer) -> None:
    rng = random.Random(4)
    ids: list[int] = []
    while len(ids) < 2000:
        ids += tokenizer.encode(random_text(rng, 40), add_special_tokens=False)
    ids = ids[:2000]
    counting = CountingTokenizer(tokenizer)
    blocked = BlockedContent([r"\bnever here\b", "(?i)nor THIS"])
    pieces, answer, stopped_at = stream(counting, ids, ["not in it", "nor that"], blocked)
    assert stopped_at is None and "".join(pieces) == answer == decode(tokenizer, ids)
    *steps, whole = counting.decoded
    assert whole == len(ids)  # finish decodes the answer once
    assert len(steps) <= 2 * len(ids) and max(steps) <= 12  # a window of recent tokens, however long the answer


PATTERNS = [r"\bab\b", r"(?<=c)de", r"x(?=y z)", r"^ab", r"(?m)^cd$", r"ab$", r"e\Z", r"(?i)ZZ", r"a{2,3}b", r"(.)\1d"]


@pytest.mark.parametrize("patterns", [PATTERNS, [*PATTERNS, r"a.*yy"]], ids=["bounded", "with-unbounded"])
def test_blocked_content_is_refused_before_the_first_piece_that_matches(model_dir: Path, patterns) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "base_model")
    compiled = [re.compile(pattern) for pattern in patterns]
    rng = random.Random(7)
    refused = 0
    for _ in range(300):
        letters = "abcdefghijklxyz \n"
        text = "".join(rng.choice(letters) for _ in range(rng.randrange(1, 80)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        plain = TextStream(tokenizer)
        guarded = TextStream(tokenizer, blocked=BlockedContent(patterns))
        sent = ""
        for count in range(1, len(ids) + 1):
            piece = plain.update(ids[:count])
            expected = any(pattern.search(sent + piece) for pattern in compiled) if piece else False
            outcome = _outcome(guarded.update, ids[:count])
            assert outcome == (BlockedContentError if expected else piece)
            if expected:
                refused += 1
                break
            sent += piece
        else:
            piece, answer = plain.finish(ids)
            expected = any(pattern.search(answer) for pattern in compiled)
            assert _outcome(guarded.finish, ids) == (BlockedContentError if expected else (piece, answer))
    assert 30 < refused < 270  # both outcomes well exercised


def _outcome(call: Callable[..., object], *args: object) -> object:
    """What ``call(*args)`` returns, or that it refused blocked content."""
    try:
        return call(*args)
    except BlockedContentError:
        return BlockedContentError


def test_pattern_reach_counts_what_the_engine_may_look_at() -> None:
    assert pattern_reach(re.compile("beep boop")) == 9 + 2
    assert pattern_reach(re.compile(r"(?<=ab)c(?=de)")) == 1 + 2 + 2 + 2
    assert pattern_reach(re.compile(r"x(?:y(?=z{1,3}))?")) == 2 + 3 + 2
    assert pattern_reach(re.compile(r"\bsecret\w*")) is None
    assert pattern_reach(re.compile(r"a(?=b+)")) is None
    assert BlockedContent(["ab", "c{1,4}"]).context == 2 * (4 + 2)
    assert BlockedContent(["ab", "c+"]).context is None
