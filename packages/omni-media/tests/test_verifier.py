"""omni_media.verifier: a contrastive word/image and word/speech scorer, trained here on small data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from omni_media.data import load_mnist
from omni_media.errors import MediaError
from omni_media.speech import TEST_VOICES, digit_split
from omni_media.verifier import (
    CrossModalVerifier,
    VerifierConfig,
    VerifierTrainConfig,
    audio_features,
    contrastive_loss,
    load_verifier,
    rerank,
    save_verifier,
    train_verifier,
)

N_HELD_OUT = 500  # MNIST test images scored


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second intra-op thread on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


@pytest.fixture(scope="module")
def speech():
    train, test = digit_split(30, 10)  # 300 training clips, 100 in voices kept out of training
    assert set(test.voices) == set(TEST_VOICES) and not set(test.voices) & set(train.voices)
    return train, test


@pytest.fixture(scope="module")
def verifier(mnist, speech):
    train, _ = speech
    fast = VerifierTrainConfig(image_steps=120, audio_steps=120, image_batch=64, audio_batch=32)
    return train_verifier(mnist.train_images[:3000], mnist.train_labels[:3000], train.waves, train.labels,
                          train=fast, seed=0)  # fmt: skip


def _wins(scores_of) -> float:
    """Fraction of items whose true word (column 0) scores above all nine wrong words."""
    return float((scores_of[:, :1] > scores_of[:, 1:]).all(-1).float().mean())


def _all_word_scores(score, media, labels: np.ndarray) -> torch.Tensor:
    """(N, 10): column k is each item's score with word (label + k) % 10; column 0 the true word."""
    return torch.stack([score(media, (labels + k) % 10) for k in range(10)], dim=1)


def test_images_score_their_own_word_highest(verifier, mnist):
    images, labels = mnist.test_images[:N_HELD_OUT], mnist.test_labels[:N_HELD_OUT]
    trained = _wins(_all_word_scores(verifier.image_scores, images, labels))
    assert trained > 0.9, trained
    # image_logits ranks the words as the cosine scores do, and an untrained verifier is at chance
    top1 = float((verifier.image_logits(images).argmax(-1).numpy() == labels).mean())
    assert top1 == pytest.approx(trained, abs=0.005)
    untrained = float((CrossModalVerifier().eval().image_logits(images).argmax(-1).numpy() == labels).mean())
    assert untrained < 0.3, untrained


def test_speech_in_unseen_voices_scores_its_own_word_highest(verifier, speech):
    _, test = speech
    features = audio_features(test.waves)  # once, rather than in each of the 20 calls below
    trained = _wins(_all_word_scores(verifier.audio_scores, features, test.labels))
    untrained = _wins(_all_word_scores(CrossModalVerifier().eval().audio_scores, features, test.labels))
    assert trained > 0.8, trained
    assert untrained < 0.3, untrained
    # clips and their features are the same input
    torch.testing.assert_close(verifier.audio_logits(features), verifier.audio_logits(test.waves))
    assert verifier.audio_logits(test.padded()).shape == (len(test), 10)  # (B, N) waves


def test_rerank_finds_the_true_image_among_candidates(verifier, mnist):
    rng = np.random.default_rng(0)
    x, y = mnist.test_images[N_HELD_OUT:], mnist.test_labels[N_HELD_OUT:]
    n, groups = 4, 200
    words = rng.integers(0, 10, groups)
    picks, truth = [], []
    for w in words:  # one image of the word, three of other digits, the true one at a random slot
        right = rng.choice(np.flatnonzero(y == w))
        wrong = rng.choice(np.flatnonzero(y != w), n - 1, replace=False)
        slot = int(rng.integers(n))
        picks.append(np.insert(wrong, slot, right))
        truth.append(slot)
    candidates = x[np.concatenate(picks)]
    best = rerank(verifier.image_scores(candidates, np.repeat(words, n)), n)
    assert best.shape == (groups,)
    hit = float((best.numpy() == np.array(truth)).mean())
    assert hit > 0.85, hit  # chance is 1/4


def test_rerank_picks_the_maximum_of_each_group():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.2, -0.5])
    assert rerank(scores, 3).tolist() == [1, 0]
    assert rerank(scores, 1).tolist() == [0] * 6  # one candidate each: nothing to choose
    with pytest.raises(MediaError, match="rerank"):
        rerank(scores, 4)
    with pytest.raises(MediaError, match="rerank"):
        rerank(scores, 0)


def test_save_load_round_trip(verifier, mnist, speech, tmp_path):
    path = save_verifier(verifier, tmp_path / "v.safetensors")
    loaded = load_verifier(path)
    assert loaded.config == verifier.config and not loaded.training
    images, labels = mnist.test_images[:200], mnist.test_labels[:200]
    assert torch.equal(loaded.image_scores(images, labels), verifier.image_scores(images, labels))
    waves, words = speech[1].waves, speech[1].labels
    assert torch.equal(loaded.audio_scores(waves, words), verifier.audio_scores(waves, words))
    assert torch.equal(loaded.scale(), verifier.scale())


def test_load_refuses_files_that_do_not_fit(verifier, tmp_path):
    from omni_media.checkpoint import save_with_config

    with pytest.raises(MediaError, match="no such file"):
        load_verifier(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(MediaError, match=r"junk\.safetensors"):
        load_verifier(tmp_path / "junk.safetensors")
    save_with_config(verifier, verifier.config, "omni-image-tokenizer/1", tmp_path / "other.safetensors")
    with pytest.raises(MediaError, match="not a verifier checkpoint"):
        load_verifier(tmp_path / "other.safetensors")
    wider = dataclasses.replace(verifier.config, dim=32)  # the config says 32, the tensors say 64
    save_with_config(verifier, wider, "omni-media-verifier/1", tmp_path / "mismatch.safetensors")
    with pytest.raises(MediaError, match="do not fit its config"):
        load_verifier(tmp_path / "mismatch.safetensors")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda v: v.image_scores(torch.rand(2, 1, 32, 32), [0, 1]), r"\(B, 1, 28, 28\)"),
        (lambda v: v.image_scores(torch.rand(2, 3, 28, 28), [0, 1]), r"\(B, 1, 28, 28\)"),
        (lambda v: v.image_logits(torch.rand(2, 28, 28)), "float images"),
        (lambda v: v.image_scores(torch.full((1, 1, 28, 28), float("nan")), [0]), "NaN"),
        (lambda v: v.image_scores(torch.rand(2, 1, 28, 28), [0, 10]), r"word ids must be in \[0, 10\)"),
        (lambda v: v.image_scores(torch.rand(2, 1, 28, 28), [-1, 3]), r"word ids must be in \[0, 10\)"),
        (lambda v: v.image_scores(torch.rand(2, 1, 28, 28), [1]), "1 word ids for 2 media"),
        (lambda v: v.image_scores(torch.rand(2, 1, 28, 28), [0.5, 1.0]), "integer"),
        (lambda v: v.audio_scores(torch.rand(2, 64, 100), [0, 1]), r"\(B, 80, T\)"),
        (lambda v: v.audio_scores([np.zeros((2, 10), np.float32)], [0]), "1-D"),
        (lambda v: v.audio_logits(np.zeros(16000, np.float32)), "list of clips"),
        (lambda v: v.audio_logits([]), "no audio clips"),
    ],
)
def test_bad_inputs_raise_one_line_media_errors(call, match):
    with pytest.raises(MediaError, match=match) as e:
        call(CrossModalVerifier().eval())
    assert "\n" not in str(e.value)


def test_train_refuses_mismatched_labels(mnist, speech):
    x, y, train = mnist.train_images[:50], mnist.train_labels[:50], speech[1]
    with pytest.raises(MediaError, match="image labels: 49 word ids for 50"):
        train_verifier(x, y[:49], train.waves, train.labels)
    with pytest.raises(MediaError, match=r"audio labels: word ids must be in \[0, 10\)"):
        train_verifier(x, y, train.waves, train.labels + 5)


def test_training_is_seeded_and_leaves_the_global_rng_alone(mnist, speech):
    x, y, clips = mnist.train_images[:500], mnist.train_labels[:500], speech[1]
    tiny = VerifierTrainConfig(image_steps=12, audio_steps=6, image_batch=32, audio_batch=16)
    seen = []
    before = torch.get_rng_state()
    a = train_verifier(x, y, clips.waves, clips.labels, train=tiny, seed=3, on_step=lambda *s: seen.append(s))
    assert torch.equal(torch.get_rng_state(), before)
    b = train_verifier(x, y, clips.waves, clips.labels, train=tiny, seed=3)
    c = train_verifier(x, y, clips.waves, clips.labels, train=tiny, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["image.head.3.weight"], sc["image.head.3.weight"])
    assert [s[:2] for s in seen] == [(i, 12) for i in range(1, 13)]
    assert all(np.isfinite(s[2]) and s[2] > 0 for s in seen)


def test_audio_only_training_leaves_the_image_tower_at_its_initial_weights(mnist, speech):
    x, y, clips = mnist.train_images[:100], mnist.train_labels[:100], speech[1]
    only_audio = VerifierTrainConfig(image_steps=0, audio_steps=5, audio_batch=16)
    trained = train_verifier(x, y, clips.waves, clips.labels, train=only_audio, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = CrossModalVerifier()
    assert torch.equal(trained.image.head[3].weight, fresh.image.head[3].weight)
    assert not torch.equal(trained.audio.head.weight, fresh.audio.head.weight)


def test_contrastive_loss_rewards_alignment_and_counts_every_positive():
    words = torch.eye(4, 8)  # four orthogonal unit words
    labels = torch.tensor([0, 0, 1, 2])
    aligned, shuffled = words[labels], words[torch.tensor([3, 1, 0, 0])]
    scale = torch.tensor(20.0)
    assert contrastive_loss(aligned, words, labels, scale) < contrastive_loss(shuffled, words, labels, scale)
    # Two identical media of word 0: the text->media target splits evenly between them, so the loss of a
    # perfect match bottoms out at the entropy of that split, (1/2) * log 2 averaged over 3 present words
    # and halved by the symmetric mean; the media->text side is ~0 at this scale.
    floor = 0.5 * (np.log(2) / 3)
    assert float(contrastive_loss(aligned, words, labels, torch.tensor(100.0))) == pytest.approx(
        floor, abs=1e-3
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"dim": 0}, "dim"), ({"n_words": True}, "n_words"), ({"temperature": 0.0}, "temperature"),
     ({"temperature": 0.1, "max_logit_scale": 5.0}, "max_logit_scale")],
)  # fmt: skip
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"VerifierConfig\.{field}"):
        VerifierConfig(**kwargs)


def test_train_config_validation():
    with pytest.raises(ValueError, match="both 0"):
        VerifierTrainConfig(image_steps=0, audio_steps=0)
    with pytest.raises(ValueError, match=r"VerifierTrainConfig\.lr"):
        VerifierTrainConfig(lr=2.0)
    with pytest.raises(ValueError, match=r"VerifierTrainConfig\.audio_batch"):
        VerifierTrainConfig(audio_batch=0)
