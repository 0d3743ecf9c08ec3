"""Peak memory of scoring completions with a large vocabulary: full logits vs chunked log-probs.

Each variant runs in a fresh Python process and reports the growth of its peak resident set
(``resource.getrusage(...).ru_maxrss``) over what the process held before the pass (torch,
the model, the batch), so the figures are the pass's own peak. Variants:
  full logits: the code before the chunked head (grpo_lab commit b4d6b51): the model's forward
      returns (N, T + 1, V) logits and a float32 log-softmax gathers the tokens;
  chunked:     ``grpo_lab.policy.forward.completion_logprobs``: hidden states at real tokens,
      projected to the vocabulary chunk by chunk (``CHUNK_ELEMENTS``);
each for the reference pass (no grad, as pi_ref and pi_old run) and the policy pass (forward
and backward, with entropy, as the update runs), plain and with the shared prefix.

    python benchmarks/logprob_memory.py            # writes benchmarks/LOGPROB_MEMORY.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# A Llama with a 32k vocabulary (Llama 2 / Mistral size) and a narrow body, so the logits are
# what dominates: 32 completions x 96 tokens after 32 prompt tokens.
SHAPE = {"vocab": 32000, "hidden": 256, "layers": 2, "heads": 4, "B": 4, "G": 8, "P": 32, "T": 96}


def _old_completion_logprobs(model, c, temperature=1.0, with_entropy=False):
    """grpo_lab's completion_logprobs before the chunked head (commit b4d6b51), verbatim math."""
    import torch

    from grpo_lab.objective import selective_log_softmax, token_entropy
    from grpo_lab.policy.forward import position_ids_from_mask

    T = c.completion_ids.shape[1]
    input_ids = torch.cat([c.prompt_ids, c.completion_ids], dim=1)
    attention_mask = torch.cat([c.prompt_mask, c.completion_mask], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=T + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logp = selective_log_softmax(logits, c.completion_ids)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(False):
            entropy = token_entropy(logits)
    return logp, entropy


def _worker(variant: str, grad: bool) -> dict:
    """One pass of ``variant``; "body only" is the chunked pass with a 320-token vocabulary,
    the part of the peak that does not depend on the vocabulary (activations of the layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_lab.policy.forward import completion_logprobs
    from grpo_lab.sampling.base import Completions

    s = dict(SHAPE, vocab=320) if variant == "body only" else SHAPE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=4 * s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    N = s["B"] * s["G"]
    prompts = torch.randint(3, s["vocab"], (s["B"], s["P"]))
    lengths = torch.randint(s["T"] // 2, s["T"] + 1, (N,))
    mask = (torch.arange(s["T"]) < lengths.unsqueeze(1)).long()
    c = Completions(
        prompt_ids=prompts.repeat_interleave(s["G"], dim=0),
        prompt_mask=torch.ones(N, s["P"], dtype=torch.long),
        completion_ids=torch.randint(3, s["vocab"], (N, s["T"])) * mask,
        completion_mask=mask,
        truncated=lengths == s["T"],
    )
    if variant == "full logits":
        run = lambda: _old_completion_logprobs(model, c, with_entropy=grad)  # noqa: E731
    else:
        group = s["G"] if variant == "chunked, shared prefix" else None
        run = lambda: completion_logprobs(model, c, with_entropy=grad, group_size=group)  # noqa: E731
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if grad:
        logp, _ = run()
        (logp * mask).sum().backward()
    else:
        with torch.inference_mode():
            run()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_growth_mib": (peak - before) / 1024, "seconds": seconds}


VARIANTS = ["full logits", "chunked", "chunked, shared prefix", "body only"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "GRAD"))
    parser.add_argument("--out", type=Path, default=HERE / "LOGPROB_MEMORY.md")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], args.worker[1] == "grad")))
        return
    import torch

    rows = []
    for grad in (False, True):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", variant, "grad" if grad else "nograd"],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((grad, variant, result))
            print(grad, variant, result, flush=True)
    s = SHAPE
    N, T, V = s["B"] * s["G"], s["T"], s["vocab"]
    logits_mib = N * (T + 1) * V * 4 / 2**20
    lines = [
        "# Peak memory of completion log-probs, 32k vocabulary",
        "",
        f"Command: `python benchmarks/logprob_memory.py` (torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads).",
        "",
        f"Model: Llama, vocabulary {V}, width {s['hidden']}, {s['layers']} layers. Batch: "
        f"{s['B']} prompts x G={s['G']} = {N} completions, {s['P']} prompt tokens, up to {T} "
        f"completion tokens. One (N, T + 1, V) float32 logits tensor is {logits_mib:.0f} MiB.",
        "",
        "Peak growth: the rise of the process's peak resident set (`ru_maxrss`) during the pass, "
        "each variant in a fresh process. `body only` is the chunked pass with a 320-token "
        "vocabulary: the layers' own share of the peak, which no change to the head removes. "
        "Seconds are one pass on a shared machine, for scale only.",
        "",
        "| pass | variant | peak growth (MiB) | seconds |",
        "|---|---|---:|---:|",
    ]
    for grad, variant, r in rows:
        kind = "policy (forward + backward, entropy)" if grad else "reference (inference mode)"
        lines.append(f"| {kind} | {variant} | {r['peak_growth_mib']:.0f} | {r['seconds']:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
