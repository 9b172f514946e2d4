"""The 2012 network in its three forms: grouped (one device), two towers in one process, and one
tower per process."""

from repro.model.distributed import DistributedTowerAlexNet, pair_loss
from repro.model.grouped import AlexNet
from repro.model.layers import LocalResponseNorm, SharedMaskDropout, local_response_norm
from repro.model.tower import Tower
from repro.model.two_tower import TwoTowerAlexNet

__all__ = ["AlexNet", "TwoTowerAlexNet", "Tower", "DistributedTowerAlexNet", "pair_loss",
           "LocalResponseNorm", "SharedMaskDropout", "local_response_norm"]
