"""Engines that turn image tasks into encoded latents: ``local`` (a DataLoader) and ``ray`` (Ray Data)."""
