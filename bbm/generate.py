"""Sample text from a trained model: ``python -m bbm.generate RUN_DIR --prompt "def "``.

RUN_DIR is a run directory (its newest checkpoint) or a directory ``python -m bbm.export`` wrote. The prompt is
one document's beginning (positions from 0, no BOS token, as in training); generation stops at the
end-of-document token or after --max-new-tokens. Each token re-runs the model on the whole context (the last
run.seq_len tokens) with plain causal SDPA, which is exact for one document, whatever backend the run trained
with: no KV cache, fast enough for small models."""
import argparse
import sys
import time
import warnings

import torch

from bbm._checks import fail
from bbm.model import build_mask


def pick(logits, *, greedy: bool, temperature: float, top_p: float, generator) -> int:
    """The next token id: the most likely one, or a sample from the ``top_p`` nucleus at ``temperature``."""
    if greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    ordered, ids = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # the most likely tokens until their mass reaches top_p
    ordered = ordered * keep
    return int(ids[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, *, context: int, eod_id: int, greedy=False, temperature=1.0,
             top_p=0.95, seed=0) -> list:
    """The ids that follow ``prompt_ids`` (a non-empty list), at most ``max_new_tokens``, without the
    end-of-document id."""
    if not prompt_ids:
        fail("prompt", "at least one token", "an empty prompt")
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        window = torch.tensor(ids[-context:], device=device)[None]
        n = window.shape[1]
        with warnings.catch_warnings():  # sdpa_causal warns that it ignores documents: here there is one
            warnings.simplefilter("ignore")
            mask = build_mask(torch.zeros(1, n, dtype=torch.int32), "sdpa_causal", device=device)
        logits = model.logits(window, torch.arange(n, device=device)[None], mask)[0, -1]
        token = pick(logits, greedy=greedy, temperature=temperature, top_p=top_p, generator=generator)
        if token == eod_id:
            break
        ids.append(token)
    return ids[len(prompt_ids):]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory (its newest checkpoint) or an export directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95, help="sample from the most likely tokens of this mass")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens: expected a positive int, got {args.max_new_tokens}")
    if not args.temperature > 0:
        parser.error(f"--temperature: expected a positive float, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p: expected a float in (0, 1], got {args.top_p}")
    from bbm.trained import load_trained

    trained = load_trained(args.source, device=args.device)
    tok = trained.tokenizer
    start = time.perf_counter()
    new = generate(trained.model, tok.encode(args.prompt).tolist(), args.max_new_tokens, context=trained.seq_len,
                   eod_id=tok.eod_id, greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed)
    print(args.prompt + tok.decode(new))
    print(f"[{len(new)} tokens in {time.perf_counter() - start:.1f} s from {trained.source}]", file=sys.stderr)


if __name__ == "__main__":
    main()
