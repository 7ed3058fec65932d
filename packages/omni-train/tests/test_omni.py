"""The any-to-any recipe's parts on a small synthetic digit world: sequences score only their answers,
placeholders match the encoders, training lowers every task's loss, generation keeps media spans
whole, and the saved decoder opens with omni_model.load."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from omni_model.multimodal import find_spans
from omni_train.errors import TrainError
from omni_train.omni import OmniConfig, OmniModel, OmniTrainConfig, loss_of, train_omni
from omni_train.omni_data import (
    AUDIO_CODES,
    CLIP_SIZE,
    IMAGE_CODES,
    KEYFRAMES,
    TASKS,
    VIDEO_GRID,
    WORDS,
    WorldData,
    make_batch,
    make_tokenizer,
    media_vocab,
    words,
)
from omni_train.omni_eval import _spans, generate

TINY = OmniConfig(dim=32, n_layers=2, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, n_experts=4, top_k=2, expert_dim=32, encoder_width=4, speech_width=8)  # fmt: skip


def _world(n: int = 16, seed: int = 0) -> WorldData:
    """Random media with consistent shapes: what build_world makes, without eSpeak or MNIST."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    return WorldData(
        images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), image_labels=np.arange(n) % 10,
        image_codes=torch.randint(0, 1000, (n, IMAGE_CODES), generator=g),
        seq_mels=torch.randn(n, 80, 300, generator=g).half(),
        seq_digits=[tuple(int(d) for d in rng.integers(0, 10, 1 + i % 3)) for i in range(n)],
        word_mels=torch.randn(n, 80, 100, generator=g).half(), word_labels=np.arange(n) % 10,
        tts_codes=torch.randint(0, 2000, (n, AUDIO_CODES), generator=g), tts_labels=np.arange(n) % 10,
        clips=rng.integers(0, 256, (n, 9, CLIP_SIZE, CLIP_SIZE), dtype=np.uint8), clip_labels=np.arange(n) % 10,
        clip_directions=np.arange(n) % 4, clip_words=np.arange(n),
        clip_codes=torch.randint(0, 1000, (n, KEYFRAMES * VIDEO_GRID), generator=g),
    )  # fmt: skip


@pytest.fixture(scope="module")
def world() -> WorldData:
    return _world()


def test_tokenizer_and_layout():
    tok = make_tokenizer()
    assert tok.vocab_size == len(WORDS) and len(set(WORDS)) == len(WORDS)
    ids = tok.encode("draw an eight")
    assert ids == words("draw an eight") and tok.decode(ids) == "draw an eight"
    assert words("which digit moves , and which way ?") == tok.encode("which digit moves, and which way?")
    v = media_vocab()
    assert v.text_vocab == len(WORDS) and v.size == len(WORDS) + 9 + 1000 + 2000 + 1000
    with pytest.raises(KeyError):
        words("paint a seven")


@pytest.mark.parametrize("task", TASKS)
def test_batches_score_only_the_answer(task, world):
    torch.manual_seed(0)
    model = OmniModel(TINY)
    rng = np.random.default_rng(0)
    b = make_batch(task, world, np.arange(4), model.vocab, rng, model.n_image_tokens, train=False)
    assistant, end = WORDS.index("<|assistant|>"), WORDS.index("<|end|>")
    for row_ids, row_t in zip(b.ids, b.targets, strict=True):
        a = int((row_ids == assistant).nonzero()[0])
        scored = (row_t != -100).nonzero()[:, 0]
        assert int(scored[0]) == a and row_t[scored[-1]] == end  # from the answer's first id to <|end|>
        assert (row_t[scored] == row_ids[scored + 1]).all()
        spans = find_spans(row_ids[: int(scored[-1]) + 2], model.vocab)
        outputs = [s for s in spans if s.kind == "codes"]
        if task.startswith("text_to_"):
            m = task.removeprefix("text_to_")
            m = "audio" if m == "speech" else m
            want = {"image": IMAGE_CODES, "audio": AUDIO_CODES, "video": KEYFRAMES * VIDEO_GRID}[m]
            assert outputs and all(s.modality == m and s.end - s.start == want for s in outputs)
        else:
            assert not outputs and all(s.start <= a for s in spans)
    logits = model(b.ids, b.media)
    assert logits.shape == (*b.ids.shape, model.vocab.size)


def test_placeholder_count_mismatch_is_a_typed_error(world):
    model = OmniModel(TINY)
    b = make_batch(
        "image_to_text", world, np.arange(2), model.vocab, np.random.default_rng(0), model.n_image_tokens
    )
    with pytest.raises(TrainError, match="placeholders"):
        model(b.ids, {"image": b.media["image"][:1]})


def test_training_lowers_every_tasks_loss(world, tmp_path):
    torch.manual_seed(0)
    model = OmniModel(TINY)
    rng = np.random.default_rng(1)
    batches = {t: make_batch(t, world, np.arange(8), model.vocab, rng, model.n_image_tokens) for t in TASKS}
    with torch.no_grad():
        before = {t: float(loss_of(model, b)) for t, b in batches.items()}
    events = []
    config = OmniTrainConfig(
        budget_s=600, warmup_s=0, lr=3e-3, max_batch=8, max_steps=60, checkpoint_every_s=2, log_every=20
    )
    result = train_omni(model, world, config, tmp_path, events.append)
    with torch.no_grad():
        after = {t: float(loss_of(model, b)) for t, b in batches.items()}
    assert result["steps"] == 60 and events[-1].kind == "done"
    drops = {t: before[t] - after[t] for t in TASKS}
    assert min(drops.values()) > 0.15 and np.mean(list(drops.values())) > 0.5, drops
    assert (tmp_path / "checkpoint" / "state.json").is_file()
    # a re-run with the same settings resumes: its steps are done, so it stops at once
    again = train_omni(model, world, config, tmp_path)
    assert again["steps"] == 60 and again["tokens"] == result["tokens"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [20, 40, 60] and set(lines[-1]["loss"]) <= set(TASKS)
    with pytest.raises(TrainError, match="another run"):
        train_omni(model, world, OmniTrainConfig(budget_s=600, lr=1e-3, max_batch=8, max_steps=60), tmp_path)
    # a longer budget (a resumed command has its own) goes on from the checkpoint
    more = train_omni(model, world, dataclasses.replace(config, max_steps=62), tmp_path)
    assert more["steps"] == 62


def test_generation_keeps_spans_whole(world):
    torch.manual_seed(0)
    model = OmniModel(TINY).eval()
    g = torch.Generator().manual_seed(0)
    for task, modality, n in (
        ("text_to_image", "image", IMAGE_CODES),
        ("text_to_video", "video", KEYFRAMES * VIDEO_GRID),
    ):
        b = make_batch(task, world, np.arange(3), model.vocab, np.random.default_rng(0), model.n_image_tokens,
                       train=False)  # fmt: skip
        rows = generate(model, b, n + 3, temperature=1.0, generator=g)
        for r in rows:
            for s in _spans(model, r, modality):
                assert len(s) == n and int(s.min()) >= 0 and int(s.max()) < 1000
    b = make_batch("image_to_text", world, np.arange(3), model.vocab, np.random.default_rng(0), model.n_image_tokens,
                   train=False)  # fmt: skip
    for r in generate(model, b, 4):
        assert len(r) <= 4 and all(t < model.vocab.size for t in r)


def test_saved_decoder_opens_with_omni_model_load(tmp_path):
    from omni_model import load
    from omni_model.native import save

    torch.manual_seed(0)
    model = OmniModel(TINY).eval()
    save(model.decoder, tmp_path / "m", tokenizer=make_tokenizer(),
         extra=lambda tmp: (tmp / "note.txt").write_text("x"))  # fmt: skip
    lm = load(tmp_path / "m", fuse=False)
    ids = torch.tensor([words("draw a seven")])
    assert torch.allclose(lm.model(ids), model.decoder(ids), atol=1e-5)
    assert lm.tokenizer.decode(lm.tokenizer.encode("say three four")) == "say three four"
    assert (tmp_path / "m" / "note.txt").read_text() == "x"
