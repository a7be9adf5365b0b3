"""VQ image tokenizers: images <-> grids of discrete codes (`<img_i>` tokens).

`load_vq(DIR)` loads either kind from its saved form (safetensors + JSON): a taming VQGAN
converted by `seesay convert vqgan` (vqgan.py, convert.py) or a small VQ-VAE trained by
`seesay train-vq` (small.py, train.py). The interface is `seesay.vq.base.VQTokenizer`.
"""

from seesay.vq.base import VQTokenizer, load_vq

__all__ = ["VQTokenizer", "load_vq"]
