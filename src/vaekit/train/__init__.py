"""Training and fine-tuning of VAEs, and latent scale calibration (see docs/train.md)."""
