"""Trainers, checkpoints, CSV logs and the torchrun entry."""
