"""Hydra imports every module under ``hydra_plugins`` when it starts: this one registers the configs'
``${b2t_update_freq:...}`` resolver (b2t_tools/hydra_configs.py), so that plain ``fairseq-hydra-train`` resolves
configs/*.yaml too. It imports neither torch nor fairseq (it runs in every Hydra application of the environment)."""

try:
    from b2t_tools.hydra_configs import register_resolvers
except ImportError:  # b2t_tools not importable here: nothing to register
    pass
else:
    register_resolvers()
