"""Pretraining: schedules, the DINO training step, health signals, checkpoints and the run loop."""
