"""What each image of a question is, in words: prior or current study, its date, a volume's slices.

One wording for training rows, the chat and the API, so a model trained on it reads served prompts the same way.

Usage:
    from medllava.image_roles import ImageInput, describe_images, with_image_roles

    inputs = [ImageInput(role="prior", date="2025-03-01"), ImageInput(role="current")]
    describe_images(inputs)      # 'Image 1: prior study (2025-03-01). Image 2: current study.'
    with_image_roles("Has the lesion grown?", inputs)
    # 'Image 1: prior study (2025-03-01). Image 2: current study.\\nHas the lesion grown?'

    shown = medllava.volumes.volume_slices("chest_ct.zip", n_slices=3)
    describe_images([ImageInput.from_volume(shown, role="current")])
    # 'Images 1-3: current study, CT volume in lung, soft tissue and bone windows (red, green, blue).
    #  Slices (axial, inferior to superior, mm from the first): 0, 40, 80.'   (one line)

In a row of the schema a user turn holds its image placeholders first and its text after them; this line starts
that text, one sentence per input (an image, or the slices of one volume). Images are numbered through the whole
conversation: `first` is the number of the turn's first image. Plain images (no role, date or volume) get no line
at all, so single-image rows read exactly as before.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass

# The roles an image can have, and how the prompt names them.
ROLES = {"prior": "prior study", "current": "current study"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_RGB = ("red", "green", "blue")


def check_date(date: str) -> str:
    """`date` if it is a calendar date written YYYY-MM-DD, else a ValueError saying so."""
    if not isinstance(date, str) or not _DATE.match(date):
        raise ValueError(f"a study date must be written YYYY-MM-DD (e.g. 2025-03-01), got {date!r:.40}")
    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        raise ValueError(f"{date!r} is not a calendar date") from None
    return date


def _window_name(channel: str) -> str:
    """'soft_tissue (W400/L40)' -> 'soft tissue'; a custom window keeps its width and level: 'W350/L50'."""
    name, _, rest = channel.partition(" (")
    return rest.rstrip(")") if name == "custom" else name.replace("_", " ")


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


@dataclass(frozen=True)
class ImageInput:
    """One input of a question: an image, or the `n_images` rendered slices of one volume.

    role: a key of `ROLES` or None; date: YYYY-MM-DD or None; for a volume, `slices` is its
    `VolumeSlices.prompt_text`, `modality` e.g. "CT" and `channels` its `VolumeSlices.channels`.
    """

    role: str | None = None
    date: str | None = None
    n_images: int = 1
    slices: str | None = None
    modality: str | None = None
    channels: tuple[str, ...] = ()

    def __post_init__(self):
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"unknown image role {self.role!r}; use one of {', '.join(ROLES)}")
        if self.date is not None:
            check_date(self.date)
        if not isinstance(self.n_images, int) or self.n_images < 1:
            raise ValueError(f"an input holds at least one image, got n_images={self.n_images!r}")
        if self.slices is None and self.n_images != 1:
            raise ValueError("several images in one input must be the slices of a volume (give `slices`)")
        if self.slices is not None and "\n" in self.slices:
            raise ValueError("a volume's slice text must be one line")

    @classmethod
    def from_volume(cls, shown, role: str | None = None, date: str | None = None) -> ImageInput:
        """The input for a `medllava.volumes.VolumeSlices` (its images go to the model in order)."""
        return cls(
            role=role,
            date=date,
            n_images=len(shown.images),
            slices=shown.prompt_text,
            modality=shown.modality,
            channels=tuple(shown.channels),
        )

    @property
    def is_volume(self) -> bool:
        return self.slices is not None

    @property
    def described(self) -> bool:
        """Whether the prompt needs to say what this input is (a role, a date, or a volume)."""
        return self.role is not None or self.date is not None or self.is_volume

    def label(self) -> str:
        """'prior study (2025-03-01)', 'CT volume in the bone window', 'current study, MR volume', 'single image'."""
        words = []
        if self.role is not None or self.date is not None:
            study = ROLES[self.role] if self.role is not None else "study"
            words.append(f"{study} ({self.date})" if self.date else study)
        if self.is_volume:
            volume = f"{self.modality or 'medical'} volume"
            if self.modality == "CT" and self.channels:
                names = [_window_name(c) for c in self.channels]
                if len(names) == 1:
                    volume += f" in the {names[0]} window"
                else:
                    volume += f" in {_join(names)} windows ({', '.join(_RGB[: len(names)])})"
            words.append(volume)
        return ", ".join(words) or "single image"


def describe_images(inputs: Sequence[ImageInput], first: int = 1) -> str:
    """One line saying what each input is, numbered from `first`; "" when no input has a role, date or volume."""
    if not any(i.described for i in inputs):
        return ""
    sentences, number = [], first
    for item in inputs:
        last = number + item.n_images - 1
        which = f"Image {number}" if item.n_images == 1 else f"Images {number}-{last}"
        sentence = f"{which}: {item.label()}."
        if item.is_volume:
            sentence += f" {item.slices.rstrip('.')}."
        sentences.append(sentence)
        number = last + 1
    return " ".join(sentences)


def with_image_roles(text: str, inputs: Sequence[ImageInput], first: int = 1) -> str:
    """`text` preceded by the line of `describe_images` (unchanged when there is nothing to say)."""
    line = describe_images(inputs, first)
    return f"{line}\n{text}" if line else text


def count_images(inputs: Sequence[ImageInput]) -> int:
    """Images the model sees for these inputs (a volume counts its slices)."""
    return sum(i.n_images for i in inputs)
