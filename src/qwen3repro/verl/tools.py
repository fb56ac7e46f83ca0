"""verl `BaseTool` adapters over our tool environment (`qwen3repro.tools`), for general RL's `tool_agent` loop.

    tools:                                            # the YAML `config_gen.tool_config` writes
      - class_name: qwen3repro.verl.tools.CalculatorTool
        config: {type: native, world_seed: 0, max_calls: 3}
        tool_schema: {type: function, function: {name: calculator, ...}}

verl builds one object per tool from that file (`verl.tools.tool_registry.initialize_tools_from_config`) and,
for every call, `create(create_kwargs=...)` → `execute(instance_id, arguments, agent_data=...)` → `release`. Each
adapter answers with `ToolEnvironment.execute`, so a call gets exactly the text our own rollouts give it (errors
included: a bad argument is the model's feedback, never an exception). The call cap of a trajectory (`max_calls`)
is counted in `agent_data.extra_fields`, verl's per-trajectory scratch space; `execute` does not await before
counting, so the parallel calls of one turn (run by `asyncio.gather` on one event loop) cannot race.

verl is imported only when a class is instantiated there (it is not in the main environment); the schemas come
from `tools.default_tools`, so the YAML and the tiny stages list the same three tools.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any
from uuid import uuid4

from ..data.world import build_world
from ..tools import ToolEnvironment, ToolLimits, call_cap_result, default_tools

__all__ = ["TOOL_CLASSES", "CalculatorTool", "LookupTool", "SearchTool", "tool_config", "environment"]

CALLS_KEY = "qwen3repro_tool_calls"  # agent_data.extra_fields entry counting a trajectory's calls


@lru_cache(maxsize=4)
def environment(world_seed: int) -> ToolEnvironment:
    """The built-in tools over the world of `world_seed`, built once per process (the search index is the costly
    part). Limits are not the environment's business here: verl enforces turns and response length, the adapter
    the call cap."""
    return ToolEnvironment(default_tools(build_world(seed=world_seed)), ToolLimits())


def _base_tool():
    from verl.tools.base_tool import BaseTool  # only in the verl environment

    return BaseTool


class _Adapter:
    """Mixed into verl's BaseTool by `_make` (so this module imports without verl)."""

    tool_name: str = ""

    def __init__(self, config: dict, tool_schema: Any):
        super().__init__(config, tool_schema)
        self.world_seed = int(config.get("world_seed", 0))
        self.max_calls = int(config.get("max_calls", 0)) or None
        self._seeds: dict[str, int] = {}

    async def create(self, instance_id: str | None = None, **kwargs) -> tuple[str, Any]:
        from verl.tools.schemas import ToolResponse

        instance_id = instance_id or str(uuid4())
        # The row's own world (extra_info.tools_kwargs[<tool>].create_kwargs.world_seed), else the config's.
        self._seeds[instance_id] = int((kwargs.get("create_kwargs") or {}).get("world_seed", self.world_seed))
        return instance_id, ToolResponse()

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs) -> tuple[Any, float, dict]:
        from verl.tools.schemas import ToolResponse

        agent_data = kwargs.get("agent_data")
        scratch = getattr(agent_data, "extra_fields", None)
        if scratch is not None:
            scratch[CALLS_KEY] = scratch.get(CALLS_KEY, 0) + 1
            if self.max_calls is not None and scratch[CALLS_KEY] > self.max_calls:
                result = call_cap_result(self.max_calls)
                return ToolResponse(text=result.content), 0.0, {"outcome": result.outcome}
        env = environment(self._seeds.get(instance_id, self.world_seed))
        result = env.execute({"name": self.tool_name, "arguments": parameters})
        # No step reward: the rollout's reward (including the valid-call bonus and malformed-call penalty) is
        # `qwen3repro.verl.reward.compute_score`'s, computed from the final answer and the call outcomes.
        return ToolResponse(text=result.content), 0.0, {"outcome": result.outcome}

    async def release(self, instance_id: str, **kwargs) -> None:
        self._seeds.pop(instance_id, None)


_CLASSES: dict[str, type] = {}


def _make(class_name: str, tool_name: str) -> type:
    """A BaseTool subclass answering `tool_name`, created on first use (verl imported then)."""
    if class_name not in _CLASSES:
        _CLASSES[class_name] = type(class_name, (_Adapter, _base_tool()), {"tool_name": tool_name,
                                                                           "__module__": __name__})
    return _CLASSES[class_name]


# verl resolves `class_name` with getattr on this module, so each name is a module attribute that builds the real
# class lazily: calling it constructs an instance of the subclass.
TOOL_CLASSES = {"calculator": "CalculatorTool", "lookup": "LookupTool", "search": "SearchTool"}


def CalculatorTool(config: dict, tool_schema: Any = None):  # noqa: N802 - verl instantiates it like a class
    return _make("CalculatorTool", "calculator")(config, tool_schema)


def LookupTool(config: dict, tool_schema: Any = None):  # noqa: N802
    return _make("LookupTool", "lookup")(config, tool_schema)


def SearchTool(config: dict, tool_schema: Any = None):  # noqa: N802
    return _make("SearchTool", "search")(config, tool_schema)


def tool_config(world_seed: int, max_calls: int) -> dict:
    """The tool YAML's content for verl (`actor_rollout_ref.rollout.multi_turn.tool_config_path`): one native tool
    per built-in tool, its schema as our template lists it."""
    env = environment(world_seed)
    return {"tools": [{"class_name": f"{__name__}.{TOOL_CLASSES[name]}",
                       "config": {"type": "native", "world_seed": world_seed, "max_calls": max_calls},
                       "tool_schema": env.tool(name).schema}
                      for name in env.names]}
