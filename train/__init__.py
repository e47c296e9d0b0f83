"""Offline trainer: datasets, encoders, backbones, stage 1 and stage 2 (PTMRec)."""
