"""SmolLM2-135M-Instruct from the zoo against transformers loading the same GGUF in float32.

On the first 4096 tokens of Hamlet in 512-token windows: top-1 next-token agreement >= 99.5% and
perplexity within 0.5% of transformers' (about 42.6).
"""

from __future__ import annotations

import pytest
import torch

import omni_model
from omni_model.corpus import text_path
from omni_model.perplexity import perplexity
from omni_model.zoo import DEFAULT_MODEL, resolve

pytestmark = pytest.mark.slow
N_TOKENS, CONTEXT = 4096, 512


@pytest.fixture(scope="module")
def models():
    import transformers

    transformers.logging.set_verbosity_error()
    path = resolve(DEFAULT_MODEL)
    ours = omni_model.load(DEFAULT_MODEL)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.tensor(ours.tokenizer.encode(text_path("hamlet").read_text(encoding="utf-8"))[:N_TOKENS])
    assert ids.numel() == N_TOKENS
    return ours, ref, ids


def test_top1_agreement_with_transformers(models):
    ours, ref, ids = models
    agree = total = 0
    max_err = 0.0
    with torch.inference_mode():
        for s in range(0, N_TOKENS, CONTEXT):
            window = ids[None, s : s + CONTEXT]
            a, b = ours.model(window), ref(window).logits.float()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += window.numel()
            max_err = max(max_err, (a - b).abs().max().item())
    assert agree / total >= 0.995, f"top-1 agreement {agree / total:.4%} (max |diff| {max_err:.2e})"


def test_perplexity_matches_transformers(models):
    ours, ref, ids = models

    class Ref(torch.nn.Module):  # the transformers model behind the same call signature
        config = ours.model.config

        def __init__(self) -> None:
            super().__init__()
            self.ref = ref

        def forward(self, input_ids):
            return self.ref(input_ids).logits

    got = perplexity(ours.model, ids, CONTEXT)
    expected = perplexity(Ref(), ids, CONTEXT)
    assert got.n_scored == expected.n_scored == N_TOKENS - N_TOKENS // CONTEXT
    assert abs(got.ppl / expected.ppl - 1) <= 0.005, f"ours {got.ppl:.3f} vs transformers {expected.ppl:.3f}"
    assert 30 < expected.ppl < 60  # the issue quotes about 42.6 for this text and window
