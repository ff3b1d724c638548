"""The environment the suite runs in: our `kernels` package is the one imported, not Hugging Face's."""

from pathlib import Path

import kernels

REPO = Path(__file__).resolve().parents[1]


def test_kernels_is_this_projects_package():
    # Hugging Face's `kernels` library has the same top-level name (README, Notes); nothing here uses it.
    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"


def test_transformers_does_not_take_our_kernels_for_its_hub_kernels():
    from transformers.utils.import_utils import is_kernels_available
    assert not is_kernels_available()      # it looks for the `kernels` distribution's version: ours has none
