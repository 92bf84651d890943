"""Class lists shared by every stage.

Emotion classes follow the paper (RaFD without its eighth class, contemptuous).
"""

EMOTIONS: tuple[str, ...] = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
NUM_EMOTIONS = len(EMOTIONS)
CONTEMPT = "contemptuous"  # RaFD's eighth class, kept only when asked for
