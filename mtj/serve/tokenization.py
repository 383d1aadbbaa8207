"""vLLM's /tokenize and /detokenize: a prompt's token ids as a completion of it reads them (or the ids of the
prompt a chat completion of some messages reads), and text back."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse, Response

from mtj.chat import ChatTemplate
from mtj.lm import LM
from mtj.serve.admission import Call
from mtj.serve.chat import render
from mtj.serve.requests import (BadRequest, DetokenizeRequest, TokenizeChatRequest, TokenizeRequest, check_model,
                                parse)


class Tokenization:
    def __init__(self, lm: LM, model_name: str, template: ChatTemplate | None):
        self.lm, self.model_name, self.template = lm, model_name, template

    async def tokenize(self, body: bytes, call: Call) -> Response:
        """{count, max_model_len, tokens, token_strs (BPE strings, when asked for)} of a prompt or of messages."""
        req = parse(lambda data: TokenizeChatRequest if "messages" in data else TokenizeRequest, body)
        check_model(req.model, self.model_name)
        tok = self.lm.tokenizer

        def encode() -> list[int]:
            text = render(self.template, req) if isinstance(req, TokenizeChatRequest) else req.prompt
            return tok.backend.encode(text, add_special_tokens=req.add_special_tokens).ids

        ids = await asyncio.to_thread(encode)
        strs = [tok.backend.id_to_token(t) for t in ids] if req.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": self.lm.config.seq, "tokens": ids, "token_strs": strs})

    async def detokenize(self, body: bytes, call: Call) -> Response:
        """{prompt}: the text of the token ids."""
        req = parse(DetokenizeRequest, body)
        check_model(req.model, self.model_name)
        vocab = self.lm.config.n_vocab
        if any(not 0 <= t < vocab for t in req.tokens):
            raise BadRequest(f"token ids must be in [0, {vocab})")
        return JSONResponse({"prompt": await asyncio.to_thread(self.lm.tokenizer.decode, req.tokens)})
