"""LightningModules (diffusion policy, VLM) and the networks they use."""
