"""Pipeline ops by theme: detection (YOLO), OCR (PP-OCR det/cls/rec), audio (VAD); each op one small class.

Importing this package registers every op; ops hold no engine and no model, only numpy/OpenCV work.
"""

from .. import classify, image  # noqa: F401  (the classic image and classification ops)
from . import audio, detection, ocr  # noqa: F401
from .audio import SpeechSegment
from .detection import Detection
from .ocr import TextLine

__all__ = ["Detection", "SpeechSegment", "TextLine"]
