"""Pulumi's mocks run programs on `asyncio.get_event_loop()`; earlier async tests (pytest-asyncio)
leave the main thread without a current loop, so each stacks test gets a fresh one."""
from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(autouse=True)
def main_thread_event_loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        asyncio.set_event_loop(None)
        loop.close()
