"""What a flow can reach besides its call: configuration, the directory, the call log, prompts, the clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from shopcall.calllog import CallLog, MissedCallSms
from shopcall.config import Config
from shopcall.directory import Directory, Menu
from shopcall.prompts import Prompts
from shopcall.screen_pop import ScreenPop
from shopcall.tts import Tts

log = logging.getLogger("shopcall.app")

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "sounds" / "prompts.toml"


@dataclass
class App:
    config: Config
    pool: AsyncConnectionPool
    prompts: Prompts
    directory: Directory
    calllog: CallLog
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    screen_pop: ScreenPop | None = None  # webhooks.ringing_url: the CRM is told whose phones ring
    tasks: set[asyncio.Task] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Work that must not hold the call (transcription, mail): kept referenced until it ends."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    @classmethod
    def build(cls, config: Config, pool: AsyncConnectionPool) -> App:
        tts = Tts(
            config.sounds_dir / "cache",
            voices={"ru": config.prompts.voice_ru, "en": config.prompts.voice_en},
            speed=config.prompts.speed,
            engine=config.prompts.tts,
        )
        prompts = Prompts(
            tts,
            texts_file=PROMPTS_FILE,
            out_dir=config.sounds_dir,
            custom_dir=Path(config.prompts.custom_dir) if config.prompts.custom_dir else None,
            variables={"shop_name": config.shop.name},
        )
        menu = Menu(timeout=config.inbound.menu_timeout, retries=config.inbound.menu_retries)
        directory = Directory(pool, timezone=config.shop.timezone, default_menu=menu)
        sms = None
        if config.inbound.missed_call_sms:
            if config.webhooks.messages_url:
                sms = MissedCallSms(config.webhooks.messages_url, {"ru": config.inbound.missed_call_text_ru,
                                                                   "en": config.inbound.missed_call_text_en},
                                    config.shop.name)
            else:
                log.warning("inbound.missed_call_sms is on but webhooks.messages_url is empty: no texts are sent")
        calllog = CallLog(pool, config.spool_dir, calls_url=config.webhooks.calls_url, api_url=config.api.public_url,
                          missed_sms=sms)
        pop = ScreenPop(config.webhooks) if config.webhooks.ringing_url else None
        return cls(config, pool, prompts, directory, calllog, screen_pop=pop)

