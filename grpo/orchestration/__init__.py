"""Orchestration: the single controller and its phases, the Ray roles, recipes, run state and the ``grpo``
command. The algorithm it drives lives at the top of :mod:`grpo`."""
