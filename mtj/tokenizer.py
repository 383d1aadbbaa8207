"""Tokenizer loading: tokenizer.json files, GPT-2 style vocab.json+merges.txt, or a known name."""

from __future__ import annotations

import json
import os

import tokenizers
from etils import epath
from tokenizers import decoders, models, pre_tokenizers, processors

from mtj.families import FAMILIES
from mtj.paths import PathLike, local_copy, user_path

EOS = "<|endoftext|>"
# Known names resolve inside $MTJ_ASSETS (offline copies of the hub files).
KNOWN = {"gpt2": "gpt2", "gpt-neox-20b": "neox/20B_tokenizer.json"}  # name -> its place under $MTJ_ASSETS
HUB = {"gpt2": "openai-community/gpt2", "gpt-neox-20b": "EleutherAI/gpt-neox-20b"}  # ... or on the Hugging Face hub


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer`: encode/decode and the EOS id."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.backend = tok
        eos = tok.token_to_id(EOS)
        self.eos_id: int | None = eos

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        return self.backend.to_str()

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(text))

    def save_pretrained(self, out: PathLike, model_max_length: int = 2048) -> None:
        """Files that `transformers.AutoTokenizer.from_pretrained` reads (into a local directory);
        `model_max_length`: the context of the model it is saved with."""
        out = user_path(out)
        self.backend.save(str(out / "tokenizer.json"))
        special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS} if self.eos_id is not None else {}
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length, **special}, indent=2))


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


def find_tokenizer_files(path: epath.Path) -> tokenizers.Tokenizer | None:
    """A tokenizer from a file or a directory, or None if the directory has none."""
    if path.is_file():
        return tokenizers.Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").is_file():
        return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _gpt2_bpe(path / "vocab.json", path / "merges.txt")
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
    return Tokenizer(tok)
