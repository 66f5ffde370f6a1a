"""The process launchers the tests use, re-exported from their installable homes."""

from mlplatform_gateway.local import GatewayProcess

from mlplatform.launch import ROOT, RedisServer, ServiceProcess, free_port, wait_for_port

__all__ = ["ROOT", "GatewayProcess", "RedisServer", "ServiceProcess", "free_port", "wait_for_port"]
