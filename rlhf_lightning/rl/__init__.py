"""PPO's phases over plain models: `rollout` (sample, score, reference log-probs, advantages) and `update`
(epochs of minibatch steps). `modules.ppo.PPOModule` orchestrates them inside Lightning."""
