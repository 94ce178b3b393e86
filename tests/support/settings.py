"""The process's settings in tests: polyburn reads its environment once per process
(``polyburn.settings``), so a test that changes the environment must make it read again."""

from __future__ import annotations

import pytest


class SettingsMonkeyPatch(pytest.MonkeyPatch):
    """``monkeypatch`` whose environment changes reach polyburn: the process's settings are
    read once (``polyburn.settings``), so each ``setenv``/``delenv``/``undo`` forgets them."""

    def setenv(self, *args, **kwargs) -> None:
        super().setenv(*args, **kwargs)
        _forget_settings()

    def delenv(self, *args, **kwargs) -> None:
        super().delenv(*args, **kwargs)
        _forget_settings()

    def undo(self) -> None:
        super().undo()
        _forget_settings()


def _forget_settings() -> None:
    from polyburn import settings

    settings.reset()
