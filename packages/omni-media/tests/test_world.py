"""The digit world: direction clips move as labelled, the clip judge reads them back, spoken sequences
hold their words in one voice, and the small encoders give the shapes the decoder's spans expect."""

import numpy as np
import pytest
import torch

from omni_media.encoders import ClipEncoder, ImageEncoder, SpeechEncoder
from omni_media.errors import MediaError
from omni_media.world import (
    DIRECTIONS,
    by_voice,
    direction_clips,
    direction_of,
    locate,
    read_clip,
    spoken_sequence,
    trim,
    voice_pool,
    word_clip,
)


def _digits(n: int, seed: int = 0) -> np.ndarray:
    """Blocky stand-in digits: a bright bar whose position depends on the index."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        y, x = rng.integers(4, 16, 2)
        out[i, y : y + 10, x : x + 8] = 255
    return out


def test_direction_clips_cross_the_canvas_in_their_direction():
    n = 8
    dirs = np.arange(n) % 4
    clips = direction_clips(_digits(n), np.arange(n) % 10, dirs, size=40, frames=9, seed=3)
    assert clips.clips.shape == (n, 9, 40, 40) and clips.clips.dtype == np.uint8
    for i in range(n):
        track = clips.corners[i]
        assert direction_of(track) == dirs[i]
        axis = 1 if DIRECTIONS[dirs[i]] in ("left", "right") else 0
        assert abs(int(track[-1, axis] - track[0, axis])) == 12  # edge to edge: 40 - 28
        assert (track[:, 1 - axis] == track[0, 1 - axis]).all()  # no drift across the motion
        # the frames hold the digit where the corners say
        y, x = track[4]
        assert np.array_equal(clips.clips[i, 4, y : y + 28, x : x + 28], _digits(n)[i])


def test_locate_finds_the_window_with_the_ink_and_direction_of_needs_motion():
    frames = np.zeros((3, 40, 40), np.uint8)
    for t, x in enumerate((0, 6, 12)):
        frames[t, 5 : 5 + 28, x : x + 28][10:18, 10:18] = 200
    corners = locate(frames)
    # the blob's centre is (5 + 13.5, x + 13.5): the window is centred on it, kept inside the canvas
    assert corners.tolist() == [[5, 0], [5, 6], [5, 12]]
    assert direction_of(np.array([[0, 0], [0, 2]])) == -1
    assert direction_of(np.array([[10, 0], [0, 1]])) == DIRECTIONS.index("up")
    with pytest.raises(MediaError):
        locate(np.zeros((2, 20, 20), np.uint8))


def test_read_clip_reads_each_frame_with_the_classifier_and_the_track():
    images = np.zeros((1, 28, 28), np.uint8)
    images[0, 8:20, 10:18] = 255  # centre of mass at the middle of the 28 x 28 box, as MNIST centres
    images[0, 8, 10] = 100  # and not symmetric, so a misplaced crop differs

    class Exact(torch.nn.Module):  # reads 3 only when the crop is the digit exactly where it was drawn
        def forward(self, x):
            same = ((x[:, 0] * 255).round() == torch.from_numpy(images[0]).float()).flatten(1).all(-1)
            return torch.nn.functional.one_hot(torch.where(same, 3, 0), 10).float()

    clips = direction_clips(images, np.array([3]), np.array([DIRECTIONS.index("down")]), seed=0)
    digits, moved = read_clip(Exact(), clips.clips[0])
    assert moved == DIRECTIONS.index("down")
    assert digits.tolist() == [3] * 9
    digits_f, moved_f = read_clip(Exact(), torch.from_numpy(clips.clips[0]).float() / 255)
    assert moved_f == moved and digits_f.tolist() == digits.tolist()


def test_direction_clips_refuse_bad_input():
    with pytest.raises(MediaError, match="uint8"):
        direction_clips(np.zeros((1, 28, 28), np.float32), np.zeros(1), np.zeros(1))
    with pytest.raises(MediaError, match="directions"):
        direction_clips(_digits(1), np.zeros(1), np.array([4]))
    with pytest.raises(MediaError, match="size"):
        direction_clips(_digits(1), np.zeros(1), np.zeros(1), size=30)
    with pytest.raises(MediaError, match="align"):
        direction_clips(_digits(1), np.zeros(1), np.zeros(1), size=44, align=3)


def test_aligned_clips_keep_keyframes_on_the_cell_grid():
    n = 40
    clips = direction_clips(
        _digits(n), np.arange(n) % 10, np.arange(n) % 4, size=44, frames=9, seed=1, align=4
    )
    keys = clips.corners[:, ::4]  # frames 0, 4, 8: 16 px in 8 frames puts each keyframe on a 4 px cell
    assert (keys % 4 == 0).all()
    assert len(np.unique(clips.corners[:, 0].min(-1))) > 1  # the offset across the motion still varies


def test_trim_and_word_clip():
    wave = np.zeros(8000, np.float32)
    wave[1600:3200] = 0.5
    t = trim(wave)
    assert len(t) == 1600 and np.all(t == 0.5)
    clip = word_clip(wave, 4000)
    assert clip.shape == (4000,) and clip[:320].max() == 0 and clip[320:1920].min() == 0.5


def test_spoken_sequences_keep_one_voice_and_every_word():
    pool = voice_pool(1, ("en", "en-us+f2"), seed=0)
    assert len(pool) == 20 and sorted(set(pool.voice_ids.tolist())) == [0, 1]
    index = by_voice(pool)
    assert all((v, d) in index for v in (0, 1) for d in range(10))
    rng = np.random.default_rng(0)
    one = spoken_sequence(pool, [3], rng, index)
    three = spoken_sequence(pool, [3, 4, 5], rng, index)
    assert three.dtype == np.float32 and len(three) > 2 * len(one)
    with pytest.raises(MediaError):
        spoken_sequence(pool, [], rng)
    with pytest.raises(MediaError):
        spoken_sequence(pool, [10], rng)


def test_encoder_shapes_and_input_checks():
    img = ImageEncoder(32, width=8, grid=2)
    assert img(torch.rand(3, 1, 28, 28)).shape == (3, 4, 32)
    clip = ClipEncoder(32, width=8, grid=2)
    assert clip(torch.rand(2, 3, 1, 40, 40)).shape == (2, 12, 32) and clip.n_tokens(3) == 12
    sp = SpeechEncoder(32, width=16)
    for frames in (100, 300, 37):
        assert sp(torch.randn(2, 80, frames)).shape == (2, SpeechEncoder.n_tokens(frames), 32)
    assert SpeechEncoder.n_tokens(300) == 38
    with pytest.raises(MediaError):
        img(torch.rand(3, 28, 28))
    with pytest.raises(MediaError):
        sp(torch.randn(2, 40, 100))


def test_image_encoder_sees_where_the_ink_is():
    """Coordinate channels: the same blob at two places gives different pooled features."""
    torch.manual_seed(0)
    enc = ImageEncoder(16, width=8, grid=1)
    a, b = torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    a[..., 2:10, 2:10] = 1
    b[..., 18:26, 18:26] = 1
    assert not torch.allclose(enc(a), enc(b), atol=1e-4)
