"""Gymnasium environments (installed as ``memrl.envs``)."""
