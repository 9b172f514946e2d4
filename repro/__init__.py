"""repro: the 2012 AlexNet (Krizhevsky, Sutskever, Hinton), faithful down to its two-GPU split."""

from repro.config import LRNConfig, ModelConfig, OptimConfig, TowerWidths
from repro.model import AlexNet, DistributedTowerAlexNet, Tower, TwoTowerAlexNet, pair_loss

__all__ = ["AlexNet", "TwoTowerAlexNet", "Tower", "DistributedTowerAlexNet", "pair_loss",
           "ModelConfig", "LRNConfig", "TowerWidths", "OptimConfig", "load_checkpoint", "load_preprocessing"]
__version__ = "0.1.0"


def load_checkpoint(path, map_location="cpu"):
    """The trained network of a checkpoint (either form's) as a grouped `repro.AlexNet` in eval mode,
    on the device map_location names ("cpu", "cuda", "cuda:1", ...). A `.safetensors` file is read as
    scripts/export_safetensors.py wrote it (repro.safetensors_io)."""
    if str(path).endswith(".safetensors"):
        from repro.safetensors_io import load_safetensors

        return load_safetensors(path, map_location=map_location)
    from repro.checkpoint import load_model

    return load_model(path, map_location=map_location)


def load_preprocessing(path, device="cpu"):
    """A training checkpoint's test-time preprocessing: image files, PIL images or uint8 (B, H, W, C)
    in; the network's input out (its training set's mean image subtracted; 1 or 10 patches)."""
    from repro.preprocess import load_preprocessing as load

    return load(path, device)
