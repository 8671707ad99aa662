"""Post-training maths: SFT, reward, DPO, distillation (and the RL losses), pure torch."""
