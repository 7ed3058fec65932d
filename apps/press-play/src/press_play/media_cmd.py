"""`press-play media train`: the media tokenizers trained offline, saved, and exported for ONNX Runtime.

`train_media` trains the FSQ image tokenizer on MNIST, the keyframe interpolator on Moving MNIST (in
the tokenizer's code space, the tokenizer reused at 64 px) and the 16 kHz codec on speech synthesised
with eSpeak NG, each judged on held-out data by a classifier trained on the originals. The command
writes the three checkpoints, their ONNX graphs (`omni_export.media`, parity checked on export) and
`media-tokenizers.json` with every figure into one folder, atomically; `just bench --suite media` runs
the same training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from press_play.common import err, fail, out, reporting_errors

media_app = typer.Typer(
    help="Media tokenizers: train, save, export.", no_args_is_help=True, rich_markup_mode="rich"
)

MARKER = "media-tokenizers.json"
EVERY = 4  # keyframe spacing of the video experiment


@dataclass
class TrainedMedia:
    tokenizer: Any  # omni_media.image_tokenizer.ImageTokenizer
    interpolator: Any  # omni_media.interpolate.KeyframeInterpolator
    codec: Any  # omni_media.codec.AudioCodec
    figures: dict[str, dict[str, float]]  # "image" / "video" / "audio" -> held-out figures
    frame_size: int  # pixels per side of the video frames the interpolator was trained on


def train_media(quick: bool = False, progress: Callable[[str], None] | None = None) -> TrainedMedia:
    """Train the three tokenizers (`quick`: a few steps on small data, for tests and smoke runs)."""
    from omni_media.codec import CodecConfig, speech_experiment
    from omni_media.codec import TrainConfig as CodecTrainConfig
    from omni_media.data import load_mnist
    from omni_media.image_tokenizer import mnist_experiment
    from omni_media.interpolate import TrainConfig as InterpolatorTrainConfig
    from omni_media.keyframes import keyframe_experiment
    from omni_media.video import moving_digits

    say = progress or (lambda what: None)
    say("image tokenizer: training on MNIST")
    steps = (30, 30) if quick else (2000, 1500)  # tokenizer, classifier: mnist_experiment's defaults
    tokenizer, _, image = mnist_experiment(steps=steps[0], classifier_steps=steps[1],
                                           test_images=500 if quick else None)  # fmt: skip
    say("keyframe interpolator: training on Moving MNIST")
    mnist = load_mnist()
    n_train, n_test, size = (16, 4, 32) if quick else (512, 64, 64)
    train = moving_digits(mnist.train_images, n_train, 13, size=size, n_digits=2, seed=0).clips
    test = moving_digits(mnist.test_images, n_test, 13, size=size, n_digits=2, seed=1).clips
    interpolator, video = keyframe_experiment(tokenizer, train, test, every=EVERY,
                                              train=InterpolatorTrainConfig(steps=20 if quick else 2000),
                                              hidden=8 if quick else 64)  # fmt: skip
    say("audio codec: synthesising speech and training")
    codec_config = CodecConfig(channels=16, n_blocks=1) if quick else CodecConfig()
    codec_train = CodecTrainConfig(steps=10, batch_size=4) if quick else CodecTrainConfig()
    counts = (3, 2) if quick else (100, 30)
    codec, _, audio = speech_experiment(n_train_per_class=counts[0], n_test_per_class=counts[1],
                                        codec_config=codec_config, train=codec_train)  # fmt: skip
    figures = {"image": image, "video": video | {"size": float(size)}, "audio": audio}
    return TrainedMedia(tokenizer, interpolator, codec, figures, size)


def media_graphs(trained: TrainedMedia) -> list[Any]:
    """The ONNX graphs of the trained tokenizers: image encoder/decoder, interpolator, codec halves."""
    from omni_export.media import codec_graphs, image_tokenizer_graphs, interpolator_graph
    from omni_media.keyframes import at_size

    grid = at_size(trained.tokenizer, trained.frame_size).grid
    return [*image_tokenizer_graphs(trained.tokenizer), interpolator_graph(trained.interpolator, grid),
            *codec_graphs(trained.codec, seconds=1.0)]  # fmt: skip


def save_media(
    trained: TrainedMedia, folder: Path, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Checkpoints, ONNX graphs and figures into `folder`, replaced atomically (only if it is ours)."""
    from omni_export.errors import ExportError
    from omni_export.media import export_media
    from omni_media.codec import save_codec
    from omni_media.image_tokenizer import save_image_tokenizer
    from omni_media.interpolate import save_interpolator
    from omni_model.files import write_text_atomic, writing_dir

    with writing_dir(folder, marker=MARKER, what="a media tokenizers folder", error=ExportError) as tmp:
        save_image_tokenizer(trained.tokenizer, tmp / "image_tokenizer.safetensors")
        save_interpolator(trained.interpolator, tmp / "interpolator.safetensors")
        save_codec(trained.codec, tmp / "codec.safetensors")
        manifest = export_media(media_graphs(trained), tmp / "onnx", on_progress=progress)
        record = {"figures": trained.figures, "frame_size": trained.frame_size, "keyframe_every": EVERY,
                  "checkpoints": ["image_tokenizer.safetensors", "interpolator.safetensors", "codec.safetensors"],
                  "onnx": {k: g["parity_max_abs"] for k, g in manifest["graphs"].items()},
                  "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # fmt: skip
        write_text_atomic(tmp / MARKER, json.dumps(record, indent=1) + "\n")
    return record


@media_app.command("train")
def train(
    output: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write (replaced if it is ours).")
    ] = Path("media-tokenizers"),
    quick: Annotated[bool, typer.Option("--quick", help="A few steps on small data: a smoke run.")] = False,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads.")] = 2,
) -> None:
    """Train the image tokenizer, keyframe interpolator and audio codec; save them with ONNX graphs."""
    with reporting_errors():
        import torch

        from omni_media.errors import MediaError

        if output.exists() and not (output / MARKER).is_file():
            fail(f"{output}: exists and is not a media tokenizers folder (no {MARKER}); not overwriting it")
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        t0 = time.monotonic()
        with err.status("starting") as status:

            def progress(what: str) -> None:
                status.update(what)
                if not err.is_terminal:
                    err.print(what)

            try:
                record = save_media(train_media(quick, progress), output, progress)
            except MediaError as e:
                fail(str(e))
            finally:
                torch.set_num_threads(before)  # the command may run inside another program
        f = record["figures"]
        out.print(f"wrote {output} in {time.monotonic() - t0:.0f} s", soft_wrap=True)
        out.print(f"image tokenizer: PSNR {f['image']['psnr_db']:.2f} dB, digits read on reconstructions "
                  f"{100 * f['image']['accuracy_reconstructed']:.2f}%")  # fmt: skip
        out.print(f"keyframes every {EVERY}: in-betweens {f['video']['psnr_interpolator']:.2f} dB "
                  f"(linear blend {f['video']['psnr_linear_blend']:.2f} dB)")  # fmt: skip
        out.print(f"audio codec: mel distance {f['audio']['mel_distance']:.3f}, words recognised on "
                  f"reconstructions {100 * f['audio']['accuracy_reconstructed']:.2f}%")  # fmt: skip
