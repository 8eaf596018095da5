"""What a flow can reach besides its call: configuration, the directory, the call log, prompts, the clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from shopcall.calllog import CallLog
from shopcall.config import Config
from shopcall.directory import Directory, Menu
from shopcall.prompts import Prompts
from shopcall.tts import Tts

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "sounds" / "prompts.toml"


@dataclass
class App:
    config: Config
    pool: AsyncConnectionPool
    prompts: Prompts
    directory: Directory
    calllog: CallLog
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

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
        return cls(config, pool, prompts, directory, CallLog(pool, config.spool_dir))

