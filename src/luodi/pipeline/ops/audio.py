"""Audio ops for voice activity detection: decode a waveform, cut it into frames, turn probabilities into segments.

Framing and segmenting follow silero-vad 6 (512-sample frames at 16 kHz with 64 samples of context); no model here.
"""

from __future__ import annotations

import io
import os
import wave
from typing import Any, NamedTuple

import numpy as np

from ...errors import PipelineError
from ..registry import register_op


class SpeechSegment(NamedTuple):
    """Speech from sample ``start`` to sample ``end`` (exclusive) of a waveform at ``sample_rate``."""

    start: int
    end: int
    sample_rate: int

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.end / self.sample_rate


@register_op
class DecodeAudio:
    """WAV file (path or bytes) or float waveform -> mono float32 in [-1, 1] at ``sample_rate``.

    Channels are averaged; a rate that is a multiple of ``sample_rate`` is decimated by taking every
    k-th sample (as silero-vad does); any other rate must be resampled by the caller.
    """

    op = "decode_audio"
    stage = "pre"

    def __init__(self, sample_rate: int = 16000) -> None:
        self.rate = int(sample_rate)

    def __call__(self, x: Any) -> np.ndarray:
        if isinstance(x, np.ndarray):
            if x.dtype.kind != "f" or x.ndim != 1:
                raise PipelineError(
                    f"a waveform array must be 1-D float at {self.rate} Hz, got {x.dtype} {list(x.shape)}"
                )
            return x.astype(np.float32, copy=False)
        if not isinstance(x, (str, os.PathLike, bytes)):
            raise PipelineError(f"cannot read audio from a {type(x).__name__}; give a .wav path, bytes or a waveform")
        try:
            with wave.open(io.BytesIO(x) if isinstance(x, bytes) else os.fspath(x), "rb") as w:
                rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
                raw = w.readframes(w.getnframes())
        except (OSError, EOFError, wave.Error) as exc:
            raise PipelineError(
                f"cannot read a PCM WAV file from {x if not isinstance(x, bytes) else 'bytes'}: {exc}"
            ) from exc
        if width == 1:
            pcm = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
        elif width in (2, 4):
            dtype = np.int16 if width == 2 else np.int32
            pcm = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max + 1)
        else:
            raise PipelineError(f"{width * 8}-bit WAV is not supported; use 8, 16 or 32-bit PCM")
        pcm = pcm.reshape(-1, channels).mean(axis=1)
        if rate != self.rate:
            if rate % self.rate:
                raise PipelineError(f"audio at {rate} Hz must be resampled to {self.rate} Hz first")
            pcm = pcm[:: rate // self.rate]
        return np.ascontiguousarray(pcm, np.float32)


@register_op
class AudioFrames:
    """Waveform [n] -> frames [ceil(n/frame), context+frame]: each frame prefixed with the ``context`` samples
    before it (zeros for the first), the last zero-padded, as silero-vad feeds its model."""

    op = "audio_frames"
    stage = "pre"

    def __init__(self, frame: int = 512, context: int = 64) -> None:
        self.frame, self.context = int(frame), int(context)

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        count = -(-len(wav) // self.frame)
        padded = np.zeros(self.context + count * self.frame, np.float32)
        padded[self.context : self.context + len(wav)] = wav
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.context + self.frame)
        return np.ascontiguousarray(windows[:: self.frame][:count])


@register_op
class SpeechSegments:
    """Per-frame speech probabilities and the waveform -> SpeechSegments, by silero-vad's rules.

    Hysteresis between ``threshold`` and ``threshold - 0.15``, speech shorter than
    ``min_speech_ms`` dropped, silences shorter than ``min_silence_ms`` bridged, segments padded by
    ``pad_ms`` (get_speech_timestamps with max_speech_duration_s=inf).
    """

    op = "speech_segments"
    stage = "post"
    options = ("threshold",)

    def __init__(
        self,
        sample_rate: int = 16000,
        frame: int = 512,
        threshold: float = 0.5,
        min_speech_ms: int = 250,
        min_silence_ms: int = 100,
        pad_ms: int = 30,
    ) -> None:
        self.rate, self.frame, self.threshold = int(sample_rate), int(frame), float(threshold)
        self.min_speech = self.rate * min_speech_ms / 1000
        self.min_silence = self.rate * min_silence_ms / 1000
        self.pad = self.rate * pad_ms / 1000

    def __call__(self, probs: np.ndarray, wav: np.ndarray, threshold: float | None = None) -> list[SpeechSegment]:
        on = self.threshold if threshold is None else float(threshold)
        off = max(on - 0.15, 0.01)
        n = len(wav)
        speeches: list[dict[str, int]] = []
        current: dict[str, int] = {}
        triggered, temp_end = False, 0
        for i, p in enumerate(np.asarray(probs, np.float64).reshape(-1).tolist()):
            sample = self.frame * i
            if p >= on and temp_end:
                temp_end = 0
            if p >= on and not triggered:
                triggered, current = True, {"start": sample}
                continue
            if p < off and triggered:
                temp_end = temp_end or sample
                if sample - temp_end < self.min_silence:
                    continue
                current["end"] = temp_end
                if current["end"] - current["start"] > self.min_speech:
                    speeches.append(current)
                current, triggered, temp_end = {}, False, 0
        if current and n - current["start"] > self.min_speech:
            current["end"] = n
            speeches.append(current)
        return [SpeechSegment(s["start"], s["end"], self.rate) for s in self._pad(speeches, n)]

    def _pad(self, speeches: list[dict[str, int]], n: int) -> list[dict[str, int]]:
        pad = self.pad
        for i, s in enumerate(speeches):
            if i == 0:
                s["start"] = int(max(0, s["start"] - pad))
            if i != len(speeches) - 1:
                gap = speeches[i + 1]["start"] - s["end"]
                if gap < 2 * pad:
                    s["end"] += int(gap // 2)
                    speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - gap // 2))
                else:
                    s["end"] = int(min(n, s["end"] + pad))
                    speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - pad))
            else:
                s["end"] = int(min(n, s["end"] + pad))
        return speeches
