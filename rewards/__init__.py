"""Rewards: the reward protocol and registry, rule-based rewards, reward models, remote rewards."""
