"""Text for image-text data sets: the cleaning rules of the reference loaders, a word tokenizer
whose vocabulary is built on the training split only, and Hugging Face tokenizers read from a
local path (never downloaded).

Tokenization happens once, at prep time; the data directory keeps the tokenizer it used
(`tokenizer-<modality>.json`) so new text can be encoded the same way later.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from mmval.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextCleaning(_Strict):
    """Rules of BalanceBenchmark's Food-101 loader (`clean_text`), each optional, and the repair
    of MELD's mis-decoded punctuation."""

    strip_retweet: bool = Field(default=False, description='drop a leading "RT "')
    strip_urls: bool = Field(default=False, description="drop from http(s):// to the line end")
    strip_hash: bool = Field(default=False, description="drop '#' characters")
    collapse_spaces: bool = Field(default=True, description="trim and collapse whitespace")
    fix_cp1252: bool = Field(
        default=False,
        description="repair text decoded with the wrong code page (MELD: 'I\\x92m' -> \"I'm\")",
    )

    @model_serializer(mode="wrap")
    def _omit_default_repair(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Off (its default), `fix_cp1252` dumps as before it existed, so a data set prepared
        earlier still matches its settings on a re-run."""
        dump = handler(self)
        if not self.fix_cp1252:
            dump.pop("fix_cp1252", None)
        return dump


_RETWEET = re.compile(r"^RT\s+")
_C1_CONTROLS = re.compile("[\x80-\x9f]")
# typographic punctuation -> ASCII, as MELD loaders do ("\x92" -> "'")
_ASCII_PUNCTUATION = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
     "\u2026": "..."}
)  # fmt: skip
_URL = re.compile(r"https?://.*")
_SPACES = re.compile(r"\s+")


def fix_cp1252(text: str) -> str:
    """Undo the code-page mix-ups of MELD's CSVs [ours: no reference loader publishes one].

    Their utterances keep Windows-1252 punctuation bytes as C1 control characters ("I\x92m",
    "\x85" for an ellipsis), and some hold UTF-8 bytes read as Latin-1 or Windows-1252
    ("\u00e2\x80\x99" or "\u00e2\u20ac\u2122" for a right quote). Such a text is re-decoded
    when it survives the round trip; leftover C1 characters are read as Windows-1252 bytes
    (the five it leaves undefined are dropped); typographic quotes, dashes and the ellipsis
    become ASCII, as MELD loaders replace "\x92" by "'".
    """
    for code_page in ("latin-1", "cp1252"):
        try:
            text = text.encode(code_page).decode("utf-8")
            break
        except UnicodeError:
            continue
    text = _C1_CONTROLS.sub(lambda m: bytes([ord(m[0])]).decode("cp1252", errors="ignore"), text)
    return text.translate(_ASCII_PUNCTUATION)


def clean_text(text: str, rules: TextCleaning) -> str:
    if rules.fix_cp1252:
        text = fix_cp1252(text)
    if rules.strip_retweet:
        text = _RETWEET.sub("", text)
    if rules.strip_urls:
        text = _URL.sub("", text)
    if rules.strip_hash:
        text = text.replace("#", "")
    if rules.collapse_spaces:
        text = _SPACES.sub(" ", text).strip()
    return text


class WordTokenizerConfig(_Strict):
    """Words and punctuation marks, vocabulary from the training split (most frequent first)."""

    kind: Literal["word"] = "word"
    max_length: int = Field(default=40, ge=1, description="ids kept per text")
    lowercase: bool = True
    min_freq: int = Field(default=1, ge=1, description="rarer training words map to [UNK]")
    max_vocab: int | None = Field(default=30000, ge=3, description="including [PAD] and [UNK]")


class HFTokenizerConfig(_Strict):
    """A Hugging Face tokenizer from disk: a tokenizer.json, or a folder holding one, or a
    BERT folder with only vocab.txt (WordPiece with [CLS]/[SEP], as BertTokenizer)."""

    kind: Literal["hf"] = "hf"
    path: Path
    max_length: int = Field(default=40, ge=1, description="ids kept per text, specials included")
    lowercase: bool = Field(default=True, description="only for a vocab.txt folder")
    sep: bool = Field(
        default=True,
        description="end a text with the tokenizer's own specials ([CLS] ... [SEP] for BERT); "
        "false: `[CLS]` and the first max_length - 1 pieces, no [SEP], the BERT input of "
        "QMF's loader",
    )

    @model_serializer(mode="wrap")
    def _omit_default_sep(self, handler: SerializerFunctionWrapHandler) -> dict:
        """At its default, `sep` dumps as before it existed, so a data set prepared earlier
        still matches its settings on a re-run."""
        dump = handler(self)
        if self.sep:
            dump.pop("sep", None)
        return dump


TokenizerConfig = Annotated[WordTokenizerConfig | HFTokenizerConfig, Field(discriminator="kind")]


_WORD = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    PAD, UNK = "[PAD]", "[UNK]"

    def __init__(self, tokens: list[str], max_length: int, lowercase: bool) -> None:
        if tokens[:2] != [self.PAD, self.UNK]:
            raise ValueError("a word vocabulary starts with [PAD], [UNK]")
        self.tokens, self.max_length, self.lowercase = tokens, max_length, lowercase
        self.ids = {token: i for i, token in enumerate(tokens)}
        self.vocab_size, self.pad_id = len(tokens), 0

    @classmethod
    def fit(cls, texts: Iterable[str], config: WordTokenizerConfig) -> WordTokenizer:
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(cls._split(text, config.lowercase))
        kept = sorted(
            (w for w, c in counts.items() if c >= config.min_freq), key=lambda w: (-counts[w], w)
        )
        if config.max_vocab is not None:
            kept = kept[: config.max_vocab - 2]
        return cls([cls.PAD, cls.UNK, *kept], config.max_length, config.lowercase)

    @staticmethod
    def _split(text: str, lowercase: bool) -> list[str]:
        return _WORD.findall(text.lower() if lowercase else text)

    def encode(self, text: str) -> np.ndarray:
        words = self._split(text, self.lowercase)[: self.max_length]
        return np.array([self.ids.get(w, 1) for w in words], dtype=np.int32)

    def to_bytes(self) -> bytes:
        state = {
            "kind": "word",
            "max_length": self.max_length,
            "lowercase": self.lowercase,
            "tokens": self.tokens,
        }
        return json.dumps(state, ensure_ascii=False).encode("utf-8")


class HFTokenizer:
    def __init__(self, tokenizer: object, max_length: int) -> None:
        from tokenizers import Tokenizer

        assert isinstance(tokenizer, Tokenizer)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        pads = (tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>", "<|pad|>"))
        self.pad_id = next((i for i in pads if i is not None), 0)

    @classmethod
    def load(cls, config: HFTokenizerConfig) -> HFTokenizer:
        from tokenizers import Tokenizer
        from tokenizers.implementations import BertWordPieceTokenizer

        path = config.path.expanduser()
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        found = None
        try:
            if path.is_file():
                found = Tokenizer.from_file(str(path))
            elif path.is_dir() and (path / "vocab.txt").is_file():
                wordpiece = BertWordPieceTokenizer(
                    str(path / "vocab.txt"), lowercase=config.lowercase
                )
                found = wordpiece._tokenizer
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise UserError(f"cannot read the tokenizer at {path}: {exc}") from None
        if found is not None:
            if not config.sep:
                _cls_first(found, path)
            return cls(found, config.max_length)
        raise UserError(
            f"no Hugging Face tokenizer at {config.path}: expected a tokenizer.json file, or a "
            "folder holding tokenizer.json or vocab.txt (mmval never downloads tokenizers)."
        )

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text).ids, dtype=np.int32)

    def to_bytes(self) -> bytes:
        return self.tokenizer.to_str().encode("utf-8")


def _cls_first(tokenizer: object, path: Path) -> None:
    """`sep: false`: the post-processor becomes `[CLS] $A`, so that with truncation (which
    counts the specials a post-processor adds) a text is `[CLS]` + pieces[:max_length - 1], as
    QMF's loader builds BERT inputs (`sentence = ["[CLS]"] + tokens[:max_seq_len - 1]`,
    QingyangZhang/QMF fe6c4c6ef7cb23f0a89594ee413d485f1854268b,
    text-image-classification/src/data/dataset.py line 89). Saved with the tokenizer, so new
    text is encoded alike."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    assert isinstance(tokenizer, Tokenizer)
    cls_id = tokenizer.token_to_id("[CLS]")
    if cls_id is None:
        raise UserError(
            f"text.tokenizer.sep: false starts every text with [CLS], and the tokenizer at "
            f"{path} has no [CLS] token (a BERT WordPiece vocabulary has one)."
        )
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", cls_id)]
    )


def build_tokenizer(
    config: WordTokenizerConfig | HFTokenizerConfig, train_texts: list[str]
) -> WordTokenizer | HFTokenizer:
    """The tokenizer a prep uses: fitted on the training texts, or loaded from disk."""
    if isinstance(config, HFTokenizerConfig):
        return HFTokenizer.load(config)
    return WordTokenizer.fit(train_texts, config)


def load_saved_tokenizer(path: Path) -> WordTokenizer | HFTokenizer:
    """Reload the tokenizer a prep saved in its data directory, to encode new text alike."""
    state = json.loads(Path(path).read_text(encoding="utf-8"))
    if state.get("kind") == "word":
        return WordTokenizer(state["tokens"], state["max_length"], state["lowercase"])
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(state))
    limit = (state.get("truncation") or {}).get("max_length") or 512
    return HFTokenizer(tokenizer, limit)
