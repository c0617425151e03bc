"""World info, process groups and the generated DeepSpeed config."""
from cratescale.distributed.deepspeed_config import deepspeed_config
from cratescale.distributed.init import exit_without_teardown, init_distributed, pick_backend, shutdown_distributed
from cratescale.distributed.world import WorldInfo, world_from_env

__all__ = ["WorldInfo", "deepspeed_config", "exit_without_teardown", "init_distributed", "pick_backend",
           "shutdown_distributed", "world_from_env"]
