"""ldm_ddp: a plain torch.distributed trainer for text-to-image latent diffusion models."""

__version__ = "0.1.0"
