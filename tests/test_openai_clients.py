"""The libraries programs reach for, unmodified, against the gateway on the tiny model:
instructor (structured outputs with pydantic, in its default tool-call mode and in JSON-schema
mode) and the OpenAI Agents SDK (an agent turn that calls a Python function and uses its
result). If one of them fails against us, that is our bug."""

from __future__ import annotations

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

instructor = pytest.importorskip("instructor")
agents = pytest.importorskip("agents")


class Shelf(BaseModel):
    """Where the robot should go."""
    model_config = ConfigDict(extra="forbid")
    shelf: int = Field(ge=1, le=9)
    label: str = Field(max_length=8)


@pytest.fixture(scope="module")
def gateway(server, start_gateway):
    return start_gateway(server.grpc_url)


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_returns_a_validated_object(gateway, mode):
    client = instructor.from_openai(openai.OpenAI(base_url=gateway + "/v1", api_key="unused"),
                                    mode=getattr(instructor.Mode, mode))
    got = client.chat.completions.create(model="tiny", response_model=Shelf, max_tokens=96, max_retries=0,
                                         messages=[{"role": "user", "content": "Which shelf has the screws?"}])
    assert isinstance(got, Shelf) and 1 <= got.shelf <= 9 and len(got.label) <= 8


def test_an_agent_calls_a_python_function_and_uses_its_result(gateway):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    set_tracing_disabled(True)  # no calls to OpenAI's tracing service
    asked = []

    @function_tool
    def shelves_in_aisle(aisle: int) -> str:
        """How many shelves an aisle has."""
        asked.append(aisle)
        return "The aisle has 12 shelves."

    model = OpenAIChatCompletionsModel(model="tiny", openai_client=openai.AsyncOpenAI(base_url=gateway + "/v1",
                                                                                      api_key="unused"))
    agent = Agent(name="robot", instructions="Answer with the tools.", tools=[shelves_in_aisle], model=model,
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=48))
    result = Runner.run_sync(agent, "How many shelves are in aisle 2?", max_turns=4)
    assert len(asked) == 1 and isinstance(asked[0], int)  # the function ran with the model's arguments
    outputs = [item for item in result.new_items if item.type == "tool_call_output_item"]
    assert outputs and outputs[0].output == "The aisle has 12 shelves."  # and its result went back in
    assert isinstance(result.final_output, str) and result.final_output  # the turn after it answered in text
