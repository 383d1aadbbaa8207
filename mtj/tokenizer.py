"""Tokenizer loading: tokenizer.json files, GPT-2 style vocab.json+merges.txt, or a known name; and a model's
chat template with the special tokens it may name (tokenizer_config.json, chat_template.jinja)."""

from __future__ import annotations

import json
import os

import tokenizers
from etils import epath
from tokenizers import decoders, models, pre_tokenizers, processors

from mtj.chat import ChatTemplate
from mtj.families import FAMILIES
from mtj.paths import PathLike, local_copy, user_path

EOS = "<|endoftext|>"
# Known names resolve inside $MTJ_ASSETS (offline copies of the hub files).
KNOWN = {"gpt2": "gpt2", "gpt-neox-20b": "neox/20B_tokenizer.json"}  # name -> its place under $MTJ_ASSETS
HUB = {"gpt2": "openai-community/gpt2", "gpt-neox-20b": "EleutherAI/gpt-neox-20b"}  # ... or on the Hugging Face hub
# tokenizer_config.json's special tokens: a chat template may use them (transformers passes them to it)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer`: encode/decode and the EOS id; the model's chat template (its
Jinja source, or None) and the special tokens' strings."""

    def __init__(self, tok: tokenizers.Tokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None):
        self.backend = tok
        eos = tok.token_to_id(EOS)
        self.eos_id: int | None = eos
        self.chat_template = chat_template
        self.special_tokens = special_tokens if special_tokens is not None else \
            {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS} if eos is not None else {}

    def chat(self, template: str | None = None) -> ChatTemplate | None:
        """The chat template (`template`, else the tokenizer's own) compiled, or None when there is none."""
        source = template if template is not None else self.chat_template
        return ChatTemplate(source, self.special_tokens) if source is not None else None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def to_item(self) -> dict:
        """What a checkpoint stores (its "tokenizer" item)."""
        return {"tokenizer_json": self.backend.to_str(), "chat_template": self.chat_template,
                "special_tokens": self.special_tokens}

    @classmethod
    def from_item(cls, item: dict) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(item["tokenizer_json"]), item.get("chat_template"),
                   item.get("special_tokens"))  # (checkpoints before chat templates have neither)

    def save_pretrained(self, out: PathLike, model_max_length: int = 2048) -> None:
        """Files that `transformers.AutoTokenizer.from_pretrained` reads (into a local directory);
        `model_max_length`: the context of the model it is saved with."""
        out = user_path(out)
        self.backend.save(str(out / "tokenizer.json"))
        template = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length, **self.special_tokens,
             **template}, indent=2))


def assets_dir() -> epath.Path | None:
    env = os.environ.get("MTJ_ASSETS")
    return user_path(env) if env else None


def _gpt2_bpe(vocab: epath.Path, merges: epath.Path) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOS) is not None:
        tok.add_special_tokens([tokenizers.AddedToken(EOS, special=True)])
    return tok


def _chat_files(path: epath.Path) -> tuple[str | None, dict[str, str] | None]:
    """A Hugging Face tokenizer directory's chat template (chat_template.jinja, or tokenizer_config.json's
    `chat_template`: a string, or named templates of which "default" is the one) and special tokens."""
    config = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    special = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    return template, special or None


def find_tokenizer_files(path: epath.Path) -> Tokenizer | None:
    """A tokenizer from a file or a directory (with the directory's chat template), or None if the directory
    has none."""
    if path.is_file():
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
    if (path / "tokenizer.json").is_file():
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), *_chat_files(path))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return Tokenizer(_gpt2_bpe(path / "vocab.json", path / "merges.txt"), *_chat_files(path))
    return None


def load_tokenizer(spec: str | None, model_type: str = "gptj") -> Tokenizer:
    """Resolve the `tokenizer` config key (None: the family's default)."""
    spec = spec or FAMILIES[model_type].tokenizer
    path = user_path(spec)
    if not path.exists() and spec in KNOWN:
        assets = assets_dir()
        if assets is None:  # no local copy named: the hub's, as transformers would fetch it
            try:
                return Tokenizer(tokenizers.Tokenizer.from_pretrained(HUB[spec]))
            except Exception as e:  # noqa: BLE001 -- offline, or the hub refused: say both ways out
                raise FileNotFoundError(
                    f"tokenizer '{spec}' is a known name, but MTJ_ASSETS is not set and {HUB[spec]} could not be "
                    f"fetched from the Hugging Face hub ({type(e).__name__}); set MTJ_ASSETS to a folder holding "
                    f"{KNOWN[spec]} (docs/assets.md) or give a tokenizer path") from None
        path = assets / KNOWN[spec]
    if not path.exists():
        raise FileNotFoundError(f"tokenizer '{spec}' not found: give a tokenizer.json, a directory with "
                                f"vocab.json+merges.txt, or one of {sorted(KNOWN)} with MTJ_ASSETS set")
    with local_copy(path) as local:  # the tokenizers library reads local files
        tok = find_tokenizer_files(local)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer.json or vocab.json+merges.txt in {path}")
    return tok
