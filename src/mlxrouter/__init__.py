"""mlxrouter: an OpenAI-compatible inference server for MLX models.

The daemon (gateway, broker, supervisor) never imports mlx; workers do.
"""

__version__ = "0.1.0"
