"""Debian's firefox-esr driven over Mozilla's Marionette protocol (the marionette-driver client),
without geckodriver: Debian does not package it, and nothing is downloaded at run time."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from marionette_driver.marionette import Marionette


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def marionette_firefox(profile: Path, width: int = 1280, height: int = 800) -> Iterator[Marionette]:
    """A headless firefox-esr on a fresh profile, its Marionette session open; closed on exit."""
    binary = shutil.which("firefox-esr") or shutil.which("firefox")
    assert binary, "Debian's firefox-esr is needed (scripts/test.sh installs it)"
    port = _free_port()
    (profile / "user.js").write_text(f'user_pref("marionette.port", {port});\n'
                                     'user_pref("browser.shell.checkDefaultBrowser", false);\n'
                                     'user_pref("datareporting.policy.dataSubmissionEnabled", false);\n'
                                     'user_pref("app.update.disabledForTesting", true);\n')
    proc = subprocess.Popen([binary, "--headless", "--marionette", "--no-remote", "--profile", str(profile),
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = Marionette(host="127.0.0.1", port=port, startup_timeout=60)
        client.start_session()
        client.set_window_rect(width=width, height=height)
        try:
            yield client
        finally:
            client.delete_session()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
