"""The digit world as paired training data for an any-to-any model: six tasks over one token layout.

Text is a closed word-level vocabulary (`WORDS`) with its own `tokenizers` tokenizer; media follow
`omni_model.multimodal.MediaVocab`: inputs are placeholder spans filled by the jointly trained encoders
(`omni_media.encoders`), outputs are the codes of the frozen media tokenizers:

    image  49 codes: the FSQ image tokenizer's 7 x 7 grid of a 28 px digit (1000 codes)
    audio  64 codes per spoken word: 32 codec frames (0.64 s) x 2 residual stages, frame-major; the
           second stage's codes are offset by the codebook size so each stage has its own rows
    video  3 keyframes (frames 0, 4, 8 of a 9-frame clip) x the 10 x 10 grid of the 40 px canvas,
           the same image tokenizer at that size; the in-between frames are interpolated

Every example reads `<|user|> prompt <|assistant|> answer <|end|>`; the loss covers the answer and
`<|end|>`. A batch holds one task, so its media inputs stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from omni_model.multimodal import MediaCodes, MediaInput, MediaVocab, build_sequence

SPECIALS = ("<|pad|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|end|>")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")  # omni_media.world.DIRECTIONS
WORDS = SPECIALS + DIGIT_WORDS + DIRECTIONS + (
    "a", "an", "draw", "show", "me", "picture", "of", "what", "which", "digit", "is", "this", "?", ",",
    "say", "speak", "transcribe", "the", "audio", "is", "said", "moves", "and", "way", "moving", "saying",
    "video", "clip", "words", "in", "it",
)  # fmt: skip
WORDS = tuple(dict.fromkeys(WORDS))  # once each, in order
TASKS = (
    "image_to_text",
    "speech_to_text",
    "video_to_text",
    "text_to_image",
    "text_to_speech",
    "text_to_video",
)

IMAGE_CODES, AUDIO_STAGE, VIDEO_GRID = 49, 1000, 100
WORD_FRAMES, N_Q = 32, 2
AUDIO_CODES = WORD_FRAMES * N_Q  # per spoken word
KEYFRAMES, KEY_EVERY, CLIP_FRAMES, CLIP_SIZE = 3, 4, 9, 40
# A 44 px canvas with the keyframes on the tokenizer's 4 px cells (direction_clips(align=4)) was tried
# with other recipe changes in one 1.75 h run; every figure but image -> text fell, so it is not used.
INPUT_FRAMES = (0, 4, 8)  # the frames the clip encoder reads
SEQ_SECONDS = 3.0  # transcription inputs are padded or cut to this
WORD_SECONDS = 1.0  # a clip's sound track: one spoken word


def media_vocab(text_vocab: int = len(WORDS)) -> MediaVocab:
    return MediaVocab(text_vocab, (("image", 1000), ("audio", N_Q * AUDIO_STAGE), ("video", 1000)))


def make_tokenizer():
    """omni_model.tokenizer.Tokenizer over WORDS (word level, whitespace and punctuation split)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from omni_model.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    backend.add_special_tokens(list(SPECIALS))
    end = WORDS.index("<|end|>")
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
        "{% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return Tokenizer(backend, source="omnicoder digit world", bos=(None, None), eos=("<|end|>", end),
                     eos_token_ids=frozenset({end}), chat_template=template,
                     special_tokens={"unk_token": "<|unk|>", "pad_token": "<|pad|>"})  # fmt: skip


def words(text: str) -> list[int]:
    """Ids of a digit-world sentence (KeyError names a word outside the vocabulary)."""
    index = {w: i for i, w in enumerate(WORDS)}
    return [index[w] for w in text.replace("?", " ?").replace(",", " ,").split()]


# The words that say what to make: dropped from a generation prompt (each becomes <|unk|>) to train and
# query the unconditional twin that classifier-free guidance needs.
CONDITION_WORDS = DIGIT_WORDS + DIRECTIONS + ("a", "an")
_CONDITION_IDS = torch.tensor([WORDS.index(w) for w in CONDITION_WORDS])


def unconditioned(ids: Tensor) -> Tensor:
    """A copy of prompt ids with every condition word replaced by <|unk|> (same length, so a batch of
    prompts and its twins decode side by side)."""
    return ids.masked_fill(torch.isin(ids, _CONDITION_IDS), WORDS.index("<|unk|>"))


def article(d: int) -> str:
    return "an" if d == 8 else "a"


PROMPTS: dict[str, tuple[str, ...]] = {
    "image_to_text": ("what digit is this ?", "which digit is this ?"),
    "speech_to_text": ("transcribe the audio", "what is said ?"),
    "video_to_text": ("which digit moves , and which way ? what is said ?",),
    "text_to_image": ("draw {a} {d}", "show me {a} {d}", "draw a picture of {a} {d}"),
    "text_to_speech": ("say {ds}", "speak the words {ds}"),
    "text_to_video": ("show {a} {d} moving {dir}", "a video of {a} {d} moving {dir}"),
}


def video_answer(digit: int, direction: int, word: int) -> str:
    return f"{DIGIT_WORDS[digit]} moving {DIRECTIONS[direction]} , saying {DIGIT_WORDS[word]}"


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class WorldData:
    """One split of the digit world, with what each task reads and writes."""

    images: np.ndarray  # uint8 (N, 28, 28)
    image_labels: np.ndarray  # (N,)
    image_codes: Tensor | None  # (N, 49) image tokenizer codes (training only)
    seq_mels: Tensor  # float16 (S, 80, 300) log-mel of spoken sequences
    seq_digits: list[tuple[int, ...]]  # what each says
    word_mels: Tensor  # float16 (W, 80, 100): single spoken words, a clip's sound track
    word_labels: np.ndarray  # (W,)
    tts_codes: Tensor | None  # (K, 64) codec codes of one spoken word each (training only)
    tts_labels: np.ndarray  # (K,)
    clips: np.ndarray  # uint8 (C, 9, 40, 40)
    clip_labels: np.ndarray
    clip_directions: np.ndarray
    clip_words: np.ndarray  # (C,) index into word_mels: the word said in the clip's sound track
    clip_codes: Tensor | None  # (C, 300) keyframe codes (training only)
    sizes: dict[str, int] = field(default_factory=dict)


def _mel(waves: list[np.ndarray], seconds: float) -> Tensor:
    from omni_media.audio import MelConfig, log_mel_batch
    from omni_media.speech import pad_batch

    n = int(16000 * seconds)
    return torch.from_numpy(log_mel_batch(list(pad_batch(waves, n)), MelConfig(chunk_seconds=None))).half()


def audio_codes(codec, waves: np.ndarray) -> Tensor:
    """(K, samples) word clips -> (K, 64) ids within the audio codebook (frame-major, stage offsets)."""
    with torch.no_grad():
        tokens = torch.cat(
            [codec.encode(torch.from_numpy(waves[i : i + 256])) for i in range(0, len(waves), 256)]
        )
    tokens = tokens[:, :, :WORD_FRAMES] + (torch.arange(N_Q) * AUDIO_STAGE).view(
        1, N_Q, 1
    )  # (K, n_q, frames)
    return tokens.transpose(1, 2).reshape(len(waves), AUDIO_CODES)


def audio_waves(codec, codes: Tensor) -> Tensor:
    """(K, 64) audio-codebook ids -> (K, samples) waveforms."""
    tokens = codes.view(len(codes), WORD_FRAMES, N_Q).transpose(1, 2) - (
        torch.arange(N_Q) * AUDIO_STAGE
    ).view(1, N_Q, 1)
    with torch.no_grad():
        return codec.decode(tokens.clamp(0, AUDIO_STAGE - 1))


def build_world(
    images: np.ndarray,
    labels: np.ndarray,
    n_words: int,
    n_sequences: int,
    n_clips: int,
    voices: tuple[str, ...],
    seed: int,
    tokenizers: tuple | None = None,
    tts_voices: tuple[str, ...] = (),
    n_tts: int = 0,
    progress: Callable[[str], None] | None = None,
) -> WorldData:
    """A split: `images` (MNIST train or test), spoken words in `voices`, sequences of 1-3 of them,
    direction clips of the images. `tokenizers` (image tokenizer, codec) adds the output codes."""
    from omni_media.keyframes import at_size, clip_tokens
    from omni_media.speech import spoken_digits
    from omni_media.world import by_voice, direction_clips, spoken_sequence, voice_pool, word_clip

    say = progress or (lambda what: None)
    rng = np.random.default_rng(seed)
    per_voice = -(-n_words // (10 * len(voices)))
    say(f"speaking {10 * per_voice * len(voices)} digit words in {len(voices)} voices")
    pool = voice_pool(per_voice, voices, seed, speed_wpm=(150, 240))
    index = by_voice(pool)
    seq_digits = [
        tuple(int(d) for d in rng.integers(0, 10, int(rng.integers(1, 4)))) for _ in range(n_sequences)
    ]
    seq_waves = [spoken_sequence(pool, ds, rng, index) for ds in seq_digits]
    clip_pick = rng.integers(0, len(images), n_clips)
    dirs = rng.integers(0, len(DIRECTIONS), n_clips)
    clips = direction_clips(images[clip_pick], labels[clip_pick], dirs, CLIP_SIZE, CLIP_FRAMES, seed=seed + 1)
    data = WorldData(
        images=images, image_labels=np.asarray(labels, np.int64), image_codes=None,
        seq_mels=_mel(seq_waves, SEQ_SECONDS), seq_digits=seq_digits,
        word_mels=_mel(list(pool.waves), WORD_SECONDS), word_labels=pool.labels,
        tts_codes=None, tts_labels=np.zeros(0, np.int64),
        clips=clips.clips, clip_labels=clips.labels, clip_directions=clips.directions,
        clip_words=rng.integers(0, len(pool), n_clips), clip_codes=None,
    )  # fmt: skip
    if tokenizers is not None:
        image_tokenizer, codec = tokenizers
        say("encoding images and keyframes")
        with torch.no_grad():
            x = torch.from_numpy(images).float().unsqueeze(1) / 255
            data.image_codes = torch.cat([image_tokenizer.encode(x[i : i + 1024]).flatten(1)
                                          for i in range(0, len(x), 1024)])  # fmt: skip
        keys = clip_tokens(at_size(image_tokenizer, CLIP_SIZE), clips.clips[:, ::KEY_EVERY])
        data.clip_codes = keys.flatten(1)  # (C, 3 * 100)
        say(f"speaking {n_tts} words for speech output")
        tts = spoken_digits(-(-n_tts // 10), seed=seed + 7, voices=tts_voices, speed_wpm=(170, 230),
                            snr_db=None)  # fmt: skip
        samples = WORD_FRAMES * codec.config.stride
        data.tts_codes = audio_codes(codec, np.stack([word_clip(w, samples) for w in tts.waves]))
        data.tts_labels = tts.labels
    return data


# ---------------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    task: str
    ids: Tensor  # (B, T)
    targets: Tensor  # (B, T): the next id where it is scored, -100 elsewhere
    media: dict[str, Tensor]  # modality -> encoder input, one per row (audio may come twice: see video)
    prompt_len: int  # positions up to and including <|assistant|> (the same in every row: eval batches)
    answers: list = field(default_factory=list)  # what each row should say or show (eval)


def _example(vocab: MediaVocab, prompt: list, answer: list) -> tuple[Tensor, Tensor, int]:
    user, assistant, end = (WORDS.index(w) for w in ("<|user|>", "<|assistant|>", "<|end|>"))
    ids, _ = build_sequence([[user], *prompt, [assistant], *answer, [end]], vocab)
    n_prompt = len(build_sequence([[user], *prompt, [assistant]], vocab)[0])
    targets = torch.full_like(ids, -100)
    targets[n_prompt - 1 : -1] = ids[n_prompt:]
    return ids, targets, n_prompt


def _pad(rows: list[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, Tensor]:
    t = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), t), WORDS.index("<|pad|>"), dtype=torch.long)
    targets = torch.full((len(rows), t), -100, dtype=torch.long)
    for i, (x, y, _) in enumerate(rows):
        ids[i, : len(x)], targets[i, : len(y)] = x, y
    return ids, targets


def make_batch(task: str, data: WorldData, rows: np.ndarray, vocab: MediaVocab, rng: np.random.Generator,
               n_image_tokens: int, train: bool = True, drop_condition: float = 0.0) -> Batch:  # fmt: skip
    """One task's batch over the examples `rows` of `data` (a random prompt template when `train`).
    A generation task's prompt loses its condition words with probability `drop_condition` (row by
    row), which teaches the unconditional model that classifier-free guidance subtracts."""
    from omni_media.encoders import SpeechEncoder

    def prompt_of(**kw) -> str:
        options = PROMPTS[task]
        return (options[int(rng.integers(len(options)))] if train else options[0]).format(**kw)

    examples, media, answers = [], {}, []
    if task == "image_to_text":
        for i in rows:
            d = int(data.image_labels[i])
            examples.append(_example(vocab, [MediaInput("image", n_image_tokens), words(prompt_of())],
                                     [words(DIGIT_WORDS[d])]))  # fmt: skip
            answers.append(DIGIT_WORDS[d])
        media["image"] = torch.from_numpy(data.images[rows]).float().unsqueeze(1) / 255
    elif task == "speech_to_text":
        n = SpeechEncoder.n_tokens(data.seq_mels.shape[-1])
        for i in rows:
            text = " ".join(DIGIT_WORDS[d] for d in data.seq_digits[i])
            examples.append(_example(vocab, [MediaInput("audio", n), words(prompt_of())], [words(text)]))
            answers.append(text)
        media["audio"] = data.seq_mels[rows].float()
    elif task == "video_to_text":
        n_video = len(INPUT_FRAMES) * n_image_tokens
        n_audio = SpeechEncoder.n_tokens(data.word_mels.shape[-1])
        for i in rows:
            text = video_answer(int(data.clip_labels[i]), int(data.clip_directions[i]),
                                int(data.word_labels[data.clip_words[i]]))  # fmt: skip
            examples.append(_example(vocab, [MediaInput("video", n_video), MediaInput("audio", n_audio),
                                             words(prompt_of())], [words(text)]))  # fmt: skip
            answers.append(text)
        frames = torch.from_numpy(data.clips[rows][:, list(INPUT_FRAMES)]).float() / 255
        media["video"] = frames.unsqueeze(2)  # (B, T, 1, S, S)
        media["audio"] = data.word_mels[data.clip_words[rows]].float()
    elif task == "text_to_image":
        for i in rows:
            d = int(data.image_labels[i])
            codes = [MediaCodes("image", data.image_codes[i])] if data.image_codes is not None else []
            examples.append(_example(vocab, [words(prompt_of(a=article(d), d=DIGIT_WORDS[d]))], codes))
            answers.append(d)
    elif task == "text_to_speech":
        for i in rows:
            ds = data.seq_digits[i]
            answer = []
            if data.tts_codes is not None:
                for d in ds:  # each word from a random clip of it
                    pick = np.flatnonzero(data.tts_labels == d)
                    answer.append(MediaCodes("audio", data.tts_codes[int(pick[rng.integers(len(pick))])]))
            examples.append(
                _example(vocab, [words(prompt_of(ds=" ".join(DIGIT_WORDS[d] for d in ds)))], answer)
            )
            answers.append(ds)
    elif task == "text_to_video":
        for i in rows:
            d, direction = int(data.clip_labels[i]), int(data.clip_directions[i])
            codes = [MediaCodes("video", data.clip_codes[i])] if data.clip_codes is not None else []
            text = prompt_of(a=article(d), d=DIGIT_WORDS[d], dir=DIRECTIONS[direction])
            examples.append(_example(vocab, [words(text)], codes))
            answers.append((d, direction))
    else:
        raise ValueError(f"unknown task {task!r} (one of {TASKS})")
    if drop_condition > 0 and task.startswith("text_to_"):
        for ids, _, n_prompt in examples:
            if rng.random() < drop_condition:
                ids[:n_prompt] = unconditioned(ids[:n_prompt])
    ids, targets = _pad(examples)
    return Batch(task, ids, targets, media, examples[0][2], answers)


def task_size(task: str, data: WorldData) -> int:
    """How many examples a task can draw from in `data`."""
    return {"image_to_text": len(data.images), "text_to_image": len(data.images),
            "speech_to_text": len(data.seq_digits), "text_to_speech": len(data.seq_digits),
            "video_to_text": len(data.clips), "text_to_video": len(data.clips)}[task]  # fmt: skip
