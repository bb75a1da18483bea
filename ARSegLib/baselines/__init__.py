"""Baselines trained and scored here beside ARSeg: the Probabilistic U-Net (Kohl et al., NeurIPS 2018)."""
