"""What happens to a training batch before the objective (and its attack) sees it.

In order: the shuffled real examples, extra examples appended at ``train.extra_fraction``
(``fortify.training.extra_data``), the augmentations of ``train.augment``, and the channels-last
memory layout when the Trainer trains channels_last. Each random step has its own seeded
``torch.Generator``; their states go into the checkpoint, so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fortify.config import TrainConfig
from fortify.data.base import Dataset, Split
from fortify.errors import ConfigError
from fortify.models.modes import restore_modes, save_modes
from fortify.training.augment import Augment
from fortify.training.extra_data import BatchPlan, ExtraDataMixer, load_extra_data

# Offsets from train.seed: each stream differs from the shuffle's and the attacks' (which use the seed)
_AUGMENT_SEED_OFFSET = 1_000_003
_EXTRA_SEED_OFFSET = 2_000_003


class BatchRecipe:
    """Turns the real batches of an epoch into the batches the objective trains on."""

    def __init__(self, config: TrainConfig, *, fill: float, extra: Split | None = None) -> None:
        self.config = config
        self.augment = Augment(crop_padding=config.augment.crop_padding, flip=config.augment.flip,
                               cutout_size=config.augment.cutout_size, fill=fill)
        self.plan = BatchPlan.for_batch(config.batch_size, config.extra_fraction)
        self.augment_rng = torch.Generator().manual_seed(config.seed + _AUGMENT_SEED_OFFSET)
        self.extra_rng = torch.Generator().manual_seed(config.seed + _EXTRA_SEED_OFFSET)
        self.extra = extra
        self.channels_last = False  # the Trainer sets the layout it trains in (train.channels_last)

    @property
    def real_batch_size(self) -> int:
        """Real examples per batch: the batch size less the extra share."""
        return self.plan.real

    def steps_per_epoch(self, n_train: int) -> int:
        """An epoch passes over the real training set once."""
        return math.ceil(n_train / self.plan.real)

    def bind(self, train: Split, model: nn.Module, bounds: tuple[float, float]) -> None:
        """Load ``train.extra_data`` when the caller did not pass it already loaded; check the layout."""
        check_augment_fits(self.config, tuple(train.x.shape[1:]), "this training set")
        if self.config.extra_data is not None and self.extra is None:
            self.extra = load_extra_data(self.config.extra_data, input_shape=tuple(train.x.shape[1:]),
                                         bounds=bounds, num_classes=count_outputs(model, train.x[:1]))

    def apply(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        if self.config.extra_data is not None:
            assert self.extra is not None, "bind() loads the extra data before the first epoch"
            batches = ExtraDataMixer(self.extra, self.plan, self.extra_rng).mix(batches)
        for x, y in batches:
            if self.config.augment.enabled:
                x = self.augment(x, generator=self.augment_rng)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    # -- checkpointing -------------------------------------------------------------------------

    def rng_state(self) -> dict[str, Tensor]:
        return {"rng.augment": self.augment_rng.get_state(), "rng.extra": self.extra_rng.get_state()}

    def set_rng_state(self, tensors: dict[str, Tensor]) -> None:
        if "rng.augment" in tensors:
            self.augment_rng.set_state(tensors["rng.augment"])
        if "rng.extra" in tensors:
            self.extra_rng.set_state(tensors["rng.extra"])


def check_dp_batch_settings(config: TrainConfig) -> None:
    """ConfigError for the batch settings DP-SGD cannot account for."""
    # DP-SGD samples each batch itself (Poisson) and accounts for exactly those examples
    used = [name for name, on in (("augment", config.augment.enabled),
                                  ("extra_data", config.extra_data is not None),
                                  ("channels_last", config.channels_last),
                                  ("compile", config.compile),
                                  ("cuda_graph", config.cuda_graph)) if on]
    if used:
        raise ConfigError(f"train.{', train.'.join(used)} cannot be combined with dp.enabled; "
                          "DP training supports ema_decay, label_smoothing and the DP objectives")


def check_augment_fits(config: TrainConfig, input_shape: tuple[int, ...], whose: str) -> None:
    """ConfigError unless augmentation is off or fits images of ``input_shape`` (C, H, W)."""
    augment = config.augment
    if not augment.enabled:
        return
    if len(input_shape) != 3:
        raise ConfigError(f"train.augment needs image data (N, C, H, W); {whose} has inputs of shape "
                          f"{input_shape}: turn augmentation off")
    side = min(input_shape[1:])
    for name in ("crop_padding", "cutout_size"):
        value = getattr(augment, name)
        if value > side:  # larger only pads or erases the whole image, at memory's cost
            raise ConfigError(f"train.augment.{name}={value} exceeds the images' shorter side ({side} "
                              f"pixels of {input_shape[1:]}); use at most {side}")


def load_recipe_data(config: TrainConfig, dataset: Dataset, *, dp: bool) -> Split | None:
    """Check the batch settings against the data (and DP) before a run starts; the extra data, loaded."""
    if dp:
        check_dp_batch_settings(config)
    check_augment_fits(config, tuple(dataset.input_shape), f"dataset {dataset.name!r}")
    if config.extra_data is None:
        return None
    BatchPlan.for_batch(config.batch_size, config.extra_fraction)  # a share the batch cannot hold: refused
    return load_extra_data(config.extra_data, input_shape=dataset.input_shape, bounds=dataset.bounds,
                           num_classes=dataset.num_classes)


@torch.no_grad()
def count_outputs(model: nn.Module, x: Tensor) -> int:
    """The number of classes ``model`` scores, from one forward pass in eval mode."""
    modes = save_modes(model)
    model.eval()
    try:
        device = next(model.parameters()).device
        return int(model(x.to(device)).shape[-1])
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:  # torch's own words, with the shape that caused them
        raise ConfigError(f"the model cannot take inputs of shape {tuple(x.shape[1:])}: {err}; choose a "
                          "model for this data (mlp takes any shape)") from None
    finally:
        restore_modes(modes)
