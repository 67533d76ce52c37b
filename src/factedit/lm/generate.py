"""Generation from the model: top-k sampling (CounterFact's fluency protocol, context templates) and greedy
decoding, one prompt or many at once, with the KV cache.

The prompt's forward runs inside a ``forward_context`` that says where each row's prompt ends; the decoding
steps run in the same context with ``decoding`` set, so module patches see the prompt once, keep what they
prepared per query, and act on generated tokens only when they ask to.
"""

from __future__ import annotations

import torch

from .hooks import forward_context
from .load import LM, holds_lock
from .tokens import encode, pad_batch


def _draw(logits: torch.Tensor, top_k: int, gen: torch.Generator, greedy: bool) -> int:
    """The next token from one position's logits (V,): argmax, or one top-k draw from ``gen``."""
    if greedy:
        return int(logits.argmax())
    vals, idx = logits.topk(top_k)
    return int(idx[torch.multinomial(torch.softmax(vals, -1).cpu(), 1, generator=gen)])


@torch.no_grad()
@holds_lock
def sample(lm: LM, prompt: str, max_length: int = 100, top_k: int = 5, seed: int = 0, greedy: bool = False,
           stop_at_eos: bool = False) -> str:
    """Continue ``prompt`` up to ``max_length`` total tokens with top-k sampling (or greedy); returns
    only the continuation. Like the CounterFact protocol, sampling runs to the full length unless
    ``stop_at_eos``. A small explicit loop with the KV cache so module patches see the prompt
    once (first forward) and never the generated tokens."""
    tok = lm.tokenizer
    ids = encode(tok, prompt)
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], device=lm.device)
    past, new = None, []
    with forward_context(torch.tensor([x.shape[1]])) as ctx:
        for _ in range(max(0, max_length - len(ids))):
            out = lm.model(input_ids=x, past_key_values=past, use_cache=True)
            ctx.decoding = True  # the next forwards are decoding steps
            past = out.past_key_values
            nxt = _draw(out.logits[0, -1].float(), top_k, gen, greedy)
            if stop_at_eos and nxt == tok.eos_token_id:
                break
            new.append(nxt)
            x = torch.tensor([[nxt]], device=lm.device)
    return tok.decode(new, skip_special_tokens=True)


@torch.no_grad()
@holds_lock
def sample_batch(lm: LM, prompts: list[str], max_length: int = 100, top_k: int = 5, seeds: list[int] | None = None,
                 greedy: bool = False, batch_size: int = 32) -> list[str]:
    """``sample`` for many prompts at once: the same continuations (row i draws from its own generator
    seeded ``seeds[i]``, one draw per step, as ``sample`` does), but each decoding step reads the
    weights once for the whole batch instead of once per prompt (single-token decoding is
    memory-bound). Prompts are right-padded: the prompt forward sees them exactly as scoring does
    (module patches find the prompt ends from the prompt context); decoding continues each row at its
    own position, its padding masked out."""
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError("one seed per prompt")
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        out.extend(_sample_chunk(lm, prompts[s : s + batch_size], max_length, top_k, seeds[s : s + batch_size], greedy))
    return out


def _decode_step(lm: LM, nxt: list[int], mask: torch.Tensor, n: torch.Tensor, step: int, past):
    """One batched decoding step with the KV cache: row b's token ``nxt[b]`` at position ``n[b] + step`` (each
    right-padded row continues at its own position). Returns the last logits (B, V), the grown mask and the cache."""
    dev = lm.device
    mask = torch.cat([mask, torch.ones(len(nxt), 1, dtype=mask.dtype, device=dev)], 1)
    pos = (n + step).to(dev)[:, None]
    o = lm.model(input_ids=torch.tensor(nxt, device=dev)[:, None], attention_mask=mask, position_ids=pos,
                 past_key_values=past, use_cache=True)
    return o.logits[:, -1], mask, o.past_key_values


def _sample_chunk(lm: LM, prompts, max_length, top_k, seeds, greedy) -> list[str]:
    tok, dev = lm.tokenizer, lm.device
    seqs = [encode(tok, p) for p in prompts]
    n = torch.tensor([len(x) for x in seqs])
    todo = [max(0, max_length - len(x)) for x in seqs]
    steps = max(todo) if todo else 0
    new: list[list[int]] = [[] for _ in prompts]
    if steps == 0:
        return ["" for _ in prompts]
    gens = [torch.Generator().manual_seed(sd) for sd in seeds]
    ids, mask = pad_batch(seqs, tok.pad_token_id if tok.pad_token_id is not None else 0)
    mask = mask.to(dev)
    with forward_context(n) as ctx:
        o = lm.model(input_ids=ids.to(dev), attention_mask=mask, use_cache=True)
        ctx.decoding = True  # the next forwards are decoding steps (the same context: per-query state is kept)
        past = o.past_key_values
        logits = o.logits[torch.arange(len(seqs)), (n - 1).to(dev)].float()  # (B, V)
        for step in range(steps):
            nxt = []
            for b in range(len(seqs)):
                t = _draw(logits[b], top_k, gens[b], greedy)
                if step < todo[b]:
                    new[b].append(t)
                nxt.append(t)
            if step == steps - 1:
                break
            logits, mask, past = _decode_step(lm, nxt, mask, n, step, past)
            logits = logits.float()
    return [tok.decode(x, skip_special_tokens=True) for x in new]


@torch.no_grad()
@holds_lock
def greedy_answers(lm: LM, prompts: list[str], max_new_tokens: int = 20, batch_size: int = 32) -> list[str]:
    """Greedy continuations of up to ``max_new_tokens`` new tokens, each row stopped at its first end-of-sequence
    token (not included); the massive-editing papers' generation protocol. Rows of one chunk decode together with
    the KV cache (the prompt forward in a context that says where each prompt ends, the steps as decoding steps);
    the batch stops once every row has ended."""
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        out.extend(_greedy_chunk(lm, prompts[s : s + batch_size], max_new_tokens))
    return out


def _greedy_chunk(lm: LM, prompts: list[str], max_new_tokens: int) -> list[str]:
    tok, dev = lm.tokenizer, lm.device
    eos = tok.eos_token_id
    seqs = [encode(tok, p) for p in prompts]
    n = torch.tensor([len(x) for x in seqs])
    ids, mask = pad_batch(seqs, tok.pad_token_id if tok.pad_token_id is not None else 0)
    mask = mask.to(dev)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with forward_context(n) as ctx:
        o = lm.model(input_ids=ids.to(dev), attention_mask=mask, use_cache=True)
        ctx.decoding = True
        past = o.past_key_values
        logits = o.logits[torch.arange(len(seqs)), (n - 1).to(dev)]  # (B, V)
        for step in range(max_new_tokens):
            nxt = logits.float().argmax(-1).tolist()
            for b, t in enumerate(nxt):
                if not done[b]:
                    if eos is not None and t == eos:
                        done[b] = True
                    else:
                        new[b].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            logits, mask, past = _decode_step(lm, nxt, mask, n, step, past)
    return [tok.decode(x, skip_special_tokens=True) for x in new]


def normalize_answer(text: str) -> str:
    """The generation protocol's comparison form: cut at the first newline, surrounding white space and one
    trailing "." removed, lower case."""
    t = text.split("\n", 1)[0].strip()
    if t.endswith("."):
        t = t[:-1]
    return t.strip().lower()
