"""Training: TrainState, optimizer, the generic accumulation step, the shared loop,
Orbax checkpoints and metric writers (SFT and RL alike)."""
