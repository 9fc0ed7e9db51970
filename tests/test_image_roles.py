"""medllava.image_roles: the one wording that says which image of a question is which."""

from __future__ import annotations

import numpy as np
import pytest

from medllava.image_roles import ImageInput, count_images, describe_images, with_image_roles
from medllava.volumes import volume_slices


def test_prior_and_current():
    inputs = [ImageInput(role="prior", date="2025-03-01"), ImageInput(role="current")]
    assert describe_images(inputs) == "Image 1: prior study (2025-03-01). Image 2: current study."
    assert with_image_roles("Has it grown?", inputs) == (
        "Image 1: prior study (2025-03-01). Image 2: current study.\nHas it grown?"
    )
    # numbered through the conversation
    assert describe_images(inputs, first=3) == "Image 3: prior study (2025-03-01). Image 4: current study."
    assert describe_images([ImageInput(date="2024-01-31")]) == "Image 1: study (2024-01-31)."


def test_plain_images_say_nothing():
    assert describe_images([ImageInput(), ImageInput()]) == ""
    assert with_image_roles("What is this?", [ImageInput()]) == "What is this?"
    assert with_image_roles("Hello", []) == "Hello"
    # beside a described one, a plain image is named as such
    assert describe_images([ImageInput(), ImageInput(role="current")]) == (
        "Image 1: single image. Image 2: current study."
    )


def _ct_nifti() -> bytes:
    import gzip

    import nibabel as nib

    w = np.full((16, 20, 6), -1000, dtype=np.int16)
    w[4:12, 5:15, :] = 40
    return gzip.compress(nib.Nifti1Image(w, np.diag([-0.8, -0.8, 2.5, 1.0])).to_bytes())


def test_volumes_say_their_slices_modality_and_windows():
    data = _ct_nifti()
    shown = volume_slices(data, n_slices=3, name="ct.nii.gz")
    volume = ImageInput.from_volume(shown, role="current", date="2025-07-01")
    assert volume.n_images == 3 and count_images([ImageInput(), volume]) == 4
    assert describe_images([ImageInput(role="prior"), volume]) == (
        "Image 1: prior study. Images 2-4: current study (2025-07-01), CT volume in lung, soft tissue and bone "
        f"windows (red, green, blue). {shown.prompt_text}."
    )
    assert shown.prompt_text.startswith("Slices (axial, inferior to superior, mm from the first): 0, ")
    one = volume_slices(data, n_slices=2, windows=[(50, 350)], name="ct.nii.gz")
    assert describe_images([ImageInput.from_volume(one)]) == (
        f"Images 1-2: CT volume in the W350/L50 window. {one.prompt_text}."
    )
    mr = volume_slices(data, n_slices=2, modality="MR", name="mr.nii.gz")
    assert describe_images([ImageInput.from_volume(mr)]).startswith("Images 1-2: MR volume. Slices (axial")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"role": "baseline"}, "unknown image role"),
        ({"date": "01/03/2025"}, "YYYY-MM-DD"),
        ({"date": "2025-13-01"}, "not a calendar date"),
        ({"n_images": 0}, "at least one image"),
        ({"n_images": 3}, "slices of a volume"),
        ({"n_images": 2, "slices": "a\nb"}, "one line"),
    ],
)
def test_bad_inputs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageInput(**kwargs)
