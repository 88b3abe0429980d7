"""Helpers for tests and benchmarks: a Mayfly home with signed packages in it.

::

    settings = Settings.from_env({"MAYFLY_HOME": str(tmp_path / "home")})
    publish_folders(settings, [Path("taskpkgs/reboot")])   # key made and trusted

The same helpers the demo uses (:mod:`mayfly.app.publishing`).
"""

from __future__ import annotations

from mayfly.app.publishing import ensure_signing_key, publish_folder, publish_folders

__all__ = ["ensure_signing_key", "publish_folder", "publish_folders"]
