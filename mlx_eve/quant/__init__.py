"""Learned quantization calibrated on images, as ``mlx_lm.quant``: ``awq``, ``gptq``, ``dwq``, ``dynamic_quant``
and what they share (``calibration``). The commands are ``python -m mlx_eve.<method>``."""
