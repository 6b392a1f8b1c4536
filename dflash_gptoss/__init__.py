"""dflash_gptoss: DFlash block-diffusion draft models for GPT-OSS.

Importing the package is cheap on purpose: torch, transformers, jax and easydel
are imported only by the modules that need them.
"""

__version__ = "0.1.0"
