"""A base model served in-process from a local transformers model, in the BaseModel protocol:
for unit tests of the loop without a server. Integration tests use a real vLLM server."""

from __future__ import annotations

import torch

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.errors import ServerError


class LocalBase:
    def __init__(self, model, *, fail_at_request: int | None = None) -> None:
        self.model = model
        self.name = "local-base"
        self.capabilities = Capabilities(
            max_k=-1,
            token_id_prompts=True,
            ids_in_response=True,
            prompt_scoring=False,
            logprobs="raw",
        )
        self.requests: list[list[int]] = []
        self.fail_at_request = fail_at_request

    @torch.inference_mode()
    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        prompt_ids = list(prompt.ids)
        self.requests.append(prompt_ids)
        if self.fail_at_request is not None and len(self.requests) == self.fail_at_request:
            raise ServerError("HTTP 503: injected fault", status_code=503, body=None)
        logits = self.model(input_ids=torch.tensor([list(prompt_ids)])).logits[0, -1].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, logprobs.numel() if k == -1 else k)
        return TopLogprobs(
            token_ids=tuple(top.indices.tolist()),
            logprobs=tuple(top.values.tolist()),
            complete=k == -1,
        )

    async def aclose(self) -> None:
        pass
