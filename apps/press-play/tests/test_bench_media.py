"""The media suite's configuration, command line and section (the run itself is covered by the export
tests of omni-export and `just bench --suite media --quick`)."""

from __future__ import annotations

import pytest

from press_play import bench
from press_play.bench_media import ComponentRow, MediaBenchConfig, MediaReport, render_media_section

MACHINE = {"cpu": "test cpu", "cores": 2, "threads": 2, "python": "3.11", "torch": "2.x", "date": "today"}


def _report(train: bool) -> MediaReport:
    r = MediaReport(MediaBenchConfig(rounds=3), MACHINE)
    r.components.append(ComponentRow("vision", "SigLIP", 93_000_000, 372 * 2**20, 3e-6, "1x3x224x224",
                                     [100.0, 90.0, 110.0], [200.0, 210.0, 190.0]))  # fmt: skip
    if train:
        r.training = {
            "image": {"tokens_per_image": 49.0, "bits_per_image": 49 * 9.965784284662087, "codebook_usage": 0.999,
                      "psnr_db": 26.98, "accuracy_original": 0.9914, "accuracy_reconstructed": 0.9897, "train_s": 297.0},
            "video": {"size": 64.0, "every": 4.0, "token_fraction": 4 / 13, "train_clips": 512.0, "train_s": 97.0,
                      "test_clips": 64.0, "psnr_interpolator": 17.47, "psnr_linear_blend": 13.95,
                      "psnr_hold_keyframe": 12.59, "psnr_all_frames_tokenized": 30.52},
            "audio": {"n_train": 1000.0, "n_train_voices": 56.0, "n_test": 300.0, "n_test_voices": 12.0,
                      "tokens_per_second": 100.0, "bitrate_bps": 996.6, "mel_distance": 0.129,
                      "mel_distance_db": 5.16, "accuracy_original": 0.9933, "accuracy_reconstructed": 0.99,
                      "total_seconds": 286.0},
        }  # fmt: skip
    return r


def test_section_has_latency_ratio_and_training_figures():
    text = render_media_section(_report(train=True))
    assert text.startswith("<!-- bench:media:start -->") and text.rstrip().endswith(
        "<!-- bench:media:end -->"
    )
    assert "| vision | SigLIP | 1x3x224x224 | 93.00 M | 372.0 MiB | 3.0e-06 | 100.0 (90.0–110.0) |" in text
    assert "| 2.00x |" in text
    assert "vocabulary 1000" in text and "**98.97%**" in text and "**99.00%**" in text
    assert "**17.47 dB**" in text and "All three trainings together: 680 s" in text
    assert "### Discrete media tokenizers" not in render_media_section(_report(train=False))


def test_config_and_command_line():
    assert MediaBenchConfig().command == ""
    assert MediaBenchConfig.quick_config(rounds=2).command == " --quick --rounds 2"
    with pytest.raises(ValueError, match="rounds"):
        MediaBenchConfig(rounds=0)
    args = bench.parse_args(["--suite", "media", "--quick", "--threads", "1"])
    assert args.configs == {"media": MediaBenchConfig.quick_config(threads=1)} and args.out is None
