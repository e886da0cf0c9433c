"""Helpers shared by the tests that run the services on the real broker."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from datacreator.bus.codec import decode
from datacreator.bus.readback import read_to_end
from datacreator.config import Settings
from datacreator.contracts import Example

M = TypeVar("M", bound=BaseModel)

MCQ = {
    "question": "Where would you most likely keep frozen peas?",
    "options": {"A": "In a bookshelf", "B": "In a freezer", "C": "In a garden shed", "D": "In a car glovebox"},
    "answer": "B",
}
MCQ_INSTRUCTION = "Create commonsense multiple-choice questions with options A to D."


async def records_of(settings: Settings, topic: str, model: type[M], request_id: str) -> list[M]:
    """Every message of the request on the topic, redeliveries included.

    Unlike `client.read_messages`, nothing is dropped: a redelivery stays (tests count them) and
    a record that does not decode fails the test.
    """
    out = []
    async for record in read_to_end(settings, topic):
        message = decode(model, record.value)
        if message.request_id == request_id:
            out.append(message)
    return out


async def example_records(settings: Settings, request_id: str) -> list[Example]:
    return await records_of(settings, settings.topics.examples, Example, request_id)
