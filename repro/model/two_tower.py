"""The paper's two-GPU network in one process: tower t on devices[t], exchanging at four points."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from repro.config import ModelConfig
from repro.exchange import LocalExchange
from repro.model import winograd
from repro.model.convert import grouped_to_towers, towers_to_grouped
from repro.model.grouped import AlexNet, resolve_config
from repro.model.layers import pad_for_conv1
from repro.model.tower import Tower


class TwoTowerAlexNet(nn.Module):
    """Two explicit `Tower`s, each holding one GPU's half of every layer, on its own device.

    Built from a grouped `AlexNet` drawn with the paper's initialisation, so one seed gives the same
    network in both forms. CUDA runs the two towers concurrently: each tower's work is queued on its
    own device and only the exchanges synchronise them.
    """

    def __init__(self, num_classes: int | None = None, devices: Sequence[str | torch.device] = ("cuda:0", "cuda:1"),
                 *, config: ModelConfig | None = None, _init: bool = True):
        super().__init__()
        cfg = self.config = resolve_config(num_classes, config)
        if cfg.towers != 2 or len(devices) != 2:
            raise ValueError(f"TwoTowerAlexNet needs a 2-tower config and 2 devices, got "
                             f"{cfg.towers} towers and devices {list(devices)}")
        self.devices = [torch.device(d) for d in devices]
        initial = AlexNet(config=cfg).state_dict() if _init else None  # first: it draws from the seed
        self.towers = nn.ModuleList(Tower(cfg, t, init=False) for t in range(2))  # filled below or by the caller
        self.exchange = LocalExchange(self.devices)
        if initial is not None:
            self.load_grouped_state(initial)
        for tower, device in zip(self.towers, self.devices):
            tower.to(device)

    @classmethod
    def from_grouped(cls, model: AlexNet, devices: Sequence[str | torch.device] = ("cuda:0", "cuda:1")
                     ) -> "TwoTowerAlexNet":
        net = cls(devices=devices, config=model.config, _init=False)
        dtype = next(model.parameters()).dtype
        for tower in net.towers:
            tower.to(dtype)  # the grouped network's precision, not the default float32
        net.load_grouped_state(model.state_dict())
        return net.train(model.training)

    def load_grouped_state(self, state: dict[str, Tensor]) -> None:
        for tower, tower_state in zip(self.towers, grouped_to_towers(state, self.config)):
            tower.load_state_dict(tower_state)

    def grouped_state(self) -> dict[str, Tensor]:
        return towers_to_grouped([t.state_dict() for t in self.towers], self.config)

    def to_grouped(self) -> AlexNet:
        """The same network as one grouped AlexNet on the CPU, in the towers' precision."""
        with torch.random.fork_rng(devices=[]):  # its initialisation is overwritten: leave the seed's stream alone
            model = AlexNet(config=self.config)
        model.to(next(self.parameters()).dtype).load_state_dict({k: v.cpu() for k, v in self.grouped_state().items()})
        return model.train(self.training)

    def _each(self, stage: str, inputs: Sequence[Tensor]) -> list[Tensor]:
        return [getattr(tower, stage)(x) for tower, x in zip(self.towers, inputs)]

    def fc7_activations(self, image: Tensor) -> Tensor:
        """Figure 4's code: fc7 of both towers, on tower 0's device."""
        fc6_full = self._to_fc6(image)
        return self.exchange.gather("fc7->fc8", self._each("fc7_activations", fc6_full))

    def _to_fc6(self, image: Tensor) -> list[Tensor]:
        ex = self.exchange
        images = [image.to(d, non_blocking=True) for d in self.devices]  # both towers see the image
        pool2_full = ex.all_gather("pool2->conv3", self._conv1_to_pool2(images))  # (B, 256, 13, 13)
        pool5_full = ex.all_gather("pool5->fc6", self._each("conv3_to_pool5", pool2_full))  # (B, 9216)
        return ex.all_gather("fc6->fc7", self._each("fc6_local", pool5_full))  # (B, 4096)

    def _conv1_to_pool2(self, images: list[Tensor]) -> list[Tensor]:
        """Each tower's pool2. Towers on one CPU share conv1's reading of the image (its cut into blocks and
        their transform: winograd.shared_input), the work each device does for itself when they are two."""
        if self.devices[0] == self.devices[1]:
            conv1 = winograd.shared_input([t.conv1 for t in self.towers], pad_for_conv1(images[0], self.config))
            if conv1 is not None:
                return self._each("relu1_to_pool2", conv1)
        return self._each("conv1_to_pool2", images)

    def forward(self, image: Tensor) -> Tensor:
        fc6_full = self._to_fc6(image)
        fc7_full = self.exchange.gather("fc7->fc8", self._each("fc7_local", fc6_full))  # (B, 4096)
        return self.towers[0].classify(fc7_full)  # (B, num_classes) on devices[0]
