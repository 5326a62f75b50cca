"""Log-probabilities of responses under a causal LM (only the positions a loss needs go through the LM head), and the
frozen lower blocks that the models of one lineage share when only their top blocks train (run once per batch)."""

from __future__ import annotations

import hashlib
import logging

import torch

from evalkit.decoding import pad_batch
from evalkit.models import final_norm_attr, layers_attr, position_ids, raw_bytes, swapped, top_blocks

log = logging.getLogger(__name__)


def join_query_response(queries: list[list[int]], responses: list[list[int]], pad_id: int
                        ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Left-padded queries followed by right-padded responses: (ids, attention mask, query width, response mask).

    An empty response keeps one masked pad so the tensor has a response column."""
    q_ids, q_mask = pad_batch(queries, pad_id, side="left")
    r_ids, r_mask = pad_batch([r if r else [pad_id] for r in responses], pad_id, side="right")
    r_mask = r_mask * torch.tensor([[1] if r else [0] for r in responses])
    return torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), q_ids.shape[1], r_mask.float()


def response_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, q_len: int, temperature: float,
                      trunk: "SharedTrunk | None" = None, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens (positions ``q_len`` on) and the per-token entropy (no gradient).

    Only the positions that predict response tokens go through the LM head (``logits_to_keep``): for a 512-token
    query and a 48-token summary that skips >90% of the vocabulary projection, the largest cost of a small model.
    Logits are divided by the sampling temperature, as where the tokens were sampled. With a shared trunk and its
    output ``hidden``, only the model's top blocks run.
    """

    n_resp = ids.shape[1] - q_len
    kw = dict(attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=n_resp + 1, use_cache=False)
    if hidden is not None:
        inner = getattr(model, "module", model)
        with top_blocks(inner, trunk.k):
            logits = model(inputs_embeds=hidden, **kw).logits
    else:
        logits = model(input_ids=ids, **kw).logits
    logits = logits[:, :-1].float() / max(temperature, 1e-6)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, q_len:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def trunk_digest(model: torch.nn.Module, k: int) -> str:
    """A digest of everything below the top ``k`` blocks: the embeddings and the lower blocks."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, layers_attr(base))
    h = hashlib.sha256()
    for module in [base.get_input_embeddings(), *list(layers)[: len(layers) - k]]:
        for p in module.parameters():
            h.update(raw_bytes(p))
    return h.hexdigest()


class SharedTrunk:
    """The frozen lower blocks that every model of one lineage shares when only the top ``k`` blocks train.

    PPO runs four models (policy, SFT reference, value model, reward model) over the same sequences, and the
    policy and value model again in every epoch. When their embeddings and lower blocks are bit-identical (checked
    once, by digest), the lower blocks run once per batch and each model runs only its own top ``k`` blocks on that
    output: the same numbers (up to float reassociation) for a fraction of the cost. Models with learned absolute
    position embeddings (GPT-2's ``wpe``) add them to ``inputs_embeds`` and are not shared.
    """

    def __init__(self, model: torch.nn.Module, k: int):
        self.model, self.k = model, k

    @classmethod
    def build(cls, models: list[torch.nn.Module], k: int) -> "SharedTrunk | None":
        if k <= 0:
            return None
        bases = [getattr(m, "base_model", m) for m in models]
        if any(hasattr(b, "wpe") for b in bases) or k >= len(getattr(bases[0], layers_attr(bases[0]))):
            return None
        digests = {trunk_digest(m, k) for m in models}
        if len(digests) != 1:
            log.warning("the models' lower blocks differ; every model runs whole")
            return None
        return cls(models[0], k)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:

        base = getattr(self.model, "base_model", self.model)
        name = layers_attr(base)
        layers = getattr(base, name)
        swaps = {name: torch.nn.ModuleList(list(layers)[: len(layers) - self.k])}
        norm = final_norm_attr(base)
        if norm:
            swaps[norm] = torch.nn.Identity()
        with swapped(base, **swaps):
            return base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).last_hidden_state
