"""The evaluation stage's config (:class:`EvalConfig`): the real labelled test set."""

from __future__ import annotations

from pydantic import Field

from intraq_core.config.stage import StageConfig


class EvalConfig(StageConfig):
    """Real labelled test set used for the final accuracy (never for model selection).

    ``data`` is a named asset (``cifar10-test``), a ``.npz`` file (``images`` uint8 NHWC,
    ``labels``), ``torchvision:cifar10`` / ``torchvision:cifar100`` (downloaded into ``root``
    when missing), an ImageFolder directory (one sub-folder of images per class) or, with
    ``labels``, a flat folder of images (the official ImageNet validation layout).

    ``classes`` is the model's class list in output order: ``imagenet1k`` (built in: the 1000
    sorted WordNet ids) or a file with one class a line, the first whitespace-separated token
    being its id (``<wnid> <names>`` lines work). With it, the sub-folders of an ImageFolder are
    labelled by their position in the list, so a subset of the classes evaluates; without it an
    ImageFolder must hold exactly the model's classes (labelled in sorted folder order).
    ``labels`` is the ground-truth file of a flat folder: ``<file name> <class>`` lines, the
    class a 0-based index in the model's order or an id of ``classes``. (The devkit's
    one-index-per-line file is refused: its indices follow the devkit's own class order.)

    Images are preprocessed by the model spec (``model.resize``/``crop_pct``/``interpolation``,
    see :class:`ModelConfig`). ``resize``/``crop`` here are deprecated overrides of
    ``model.resize``/``model.image_size`` (a warning says so). ``num_workers`` processes decode
    image files in parallel (None: min(4, CPUs)); the order of the images never depends on it.
    """

    data: str = "cifar10-test"
    root: str | None = None
    classes: str | None = None
    labels: str | None = None
    batch_size: int = Field(default=500, ge=1)
    resize: int | None = Field(default=None, ge=1)
    crop: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)
    num_workers: int | None = Field(default=None, ge=0)
