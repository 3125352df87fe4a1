"""RSANet study: recurrent slice-wise attention for MS lesion segmentation, reproducibly."""

__version__ = "0.1.0"
