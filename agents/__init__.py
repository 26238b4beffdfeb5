"""The AMC agent (He et al. 2018), installed as ``autoprune.agents``: a gymnasium pruning
environment (``autoprune/Pruning-v0``), a DDPG agent and its Ray Tune searcher
(``autoprune search --searcher amc``). Importing this package registers the environment with
gymnasium; torch is only imported when the environment or the agent is built."""

import gymnasium

ENV_ID = "autoprune/Pruning-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="autoprune.agents.env:PruningEnv")
