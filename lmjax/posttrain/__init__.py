"""Post-training: SFT, reward models, DPO-family preference optimisation and PPO (RLHF).

`params` holds the task description and the params layout, `tasks` the per-task data, loss and
optimizer plugged into the one training loop, `ppo` the rollout-then-update loop.
"""
