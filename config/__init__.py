"""Configuration: pydantic schemas for the node, and ``load_node_config`` that validates them before anything binds.

Every setting is documented data (a ``description`` on each field); nothing in a config file is executed.
"""

from config.node import ConfigError, NodeConfig, load_node_config

__all__ = ["ConfigError", "NodeConfig", "load_node_config"]
