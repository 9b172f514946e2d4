"""The paper's two-GPU network with one tower per process of a torch.distributed group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from repro.config import ModelConfig
from repro.exchange import PairExchange
from repro.model.convert import grouped_to_towers
from repro.model.grouped import AlexNet
from repro.model.tower import Tower


class DistributedTowerAlexNet(nn.Module):
    """This process's `Tower` of one model replica; the other towers live in the other processes of
    `group` (tower index = rank in the group). The same code runs over gloo (CPU) and NCCL (GPU).

    `forward` returns the logits on tower 0 and an empty (B, 0) anchor on the other towers; build the
    loss with `pair_loss`, call backward on every tower, and the exchanges carry the gradients.
    """

    def __init__(self, config: ModelConfig, group: dist.ProcessGroup | None, device: str | torch.device,
                 grouped_state: dict[str, Tensor] | None = None):
        super().__init__()
        self.exchange = PairExchange(group)
        if self.exchange.towers != config.towers:
            raise ValueError(f"the process group has {self.exchange.towers} ranks but the model has "
                             f"{config.towers} towers: launch one process per tower")
        self.config = config
        # Every rank draws the full grouped network from the same seed and keeps its own block, so
        # the distributed network equals AlexNet(config) drawn with that seed.
        state = grouped_state if grouped_state is not None else AlexNet(config=config).state_dict()
        self.tower = Tower(config, self.exchange.tower, init=False)  # its block of the grouped draw, next
        self.tower.load_state_dict(grouped_to_towers(state, config)[self.exchange.tower])
        self.tower.to(device)

    @property
    def is_first(self) -> bool:
        """Whether this process holds tower 0, where fc8, the logits and the loss live."""
        return self.exchange.tower == 0

    def _to_fc6(self, image: Tensor) -> Tensor:
        t, ex = self.tower, self.exchange
        pool2_full = ex.all_gather("pool2->conv3", t.conv1_to_pool2(image))  # (B, 256, 13, 13)
        pool5_full = ex.all_gather("pool5->fc6", t.conv3_to_pool5(pool2_full))  # (B, 9216)
        return ex.all_gather("fc6->fc7", t.fc6_local(pool5_full))  # (B, 4096)

    def forward(self, image: Tensor) -> Tensor:
        fc7_full = self.exchange.gather("fc7->fc8", self.tower.fc7_local(self._to_fc6(image)))
        return self.tower.classify(fc7_full) if self.is_first else fc7_full  # logits or anchor

    def fc7_activations(self, image: Tensor) -> Tensor:
        """Figure 4's code on tower 0 (B, 4096); an empty anchor elsewhere."""
        return self.exchange.gather("fc7->fc8", self.tower.fc7_activations(self._to_fc6(image)))


def pair_loss(output: Tensor, target: Tensor, criterion=nn.functional.cross_entropy) -> Tensor:
    """The loss on tower 0; on the other towers a zero that starts their backward pass."""
    return output.sum() if output.shape[-1] == 0 else criterion(output, target)
