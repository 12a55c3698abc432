"""Diffusion policy (paper 4.3): processor, network, LightningModule."""
