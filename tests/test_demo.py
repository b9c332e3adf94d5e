"""The offline demo (`python -m devtools.demo`), run as a newcomer would, plus its transcript recorder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from PIL import Image

from devtools.demo.run import DEFAULT_PROMPT
from devtools.demo.transcript import TranscriptRecorder, build_transcript, render_markdown
from devtools.fakes.discord.server import DiscordStandIn, StoredMessage

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE_7_9 = (896, 1152)  # the default --aspect


def test_demo_runs_offline_and_writes_images_and_transcripts(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # No credentials: the demo must not need (or read) real ones.
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "SEGMIND_API_KEY")}
    finished = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--out", str(out), "--samples", "1"],
        check=False,  # the exit status is asserted below, with the output
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert finished.returncode == 0, f"stdout:\n{finished.stdout}\nstderr:\n{finished.stderr[-4000:]}"
    assert "Traceback" not in finished.stderr
    assert "transcript.md" in finished.stdout

    data = json.loads((out / "transcript.json").read_text("utf-8"))
    images = data["result"]["images"]
    assert len(images) == 1
    for image in images:
        with Image.open(out / image["file"]) as picture:
            picture.load()
            assert picture.size == SIZE_7_9
        assert (out / image["file"]).stat().st_size == image["size"]

    seed = data["result"]["seed"]
    assert seed and seed.isdigit()
    markdown = (out / "transcript.md").read_text("utf-8")
    assert DEFAULT_PROMPT in markdown
    assert seed in markdown

    imagine, info = data["interactions"]
    assert imagine["label"] == "/imagine"
    first = imagine["events"][0]
    # Acknowledged at once with the job's first progress line, its estimate in it.
    assert (first["kind"], first["type"], first["accepted"]) == ("callback", 4, True)
    shown = next(e for e in imagine["events"] if e["kind"] == "message")
    assert shown["content"].startswith("📨 Queued") and "(estimate)" in shown["content"]
    delivered = [e for e in imagine["events"] if e.get("attachments")]
    assert delivered and delivered[0]["attachments"][0]["filename"] == images[0]["file"]
    reply = next(e for e in info["events"] if e["kind"] == "message")
    assert "ephemeral" in reply["flags"]
    assert (out / "bot.sqlite3").exists()


def test_the_admin_demo_shows_a_blocked_prompt_and_a_moderators_ban_from_the_mod_log(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    finished = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--admin", "--out", str(out), "--samples", "1"],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert finished.returncode == 0, f"stdout:\n{finished.stdout}\nstderr:\n{finished.stderr[-4000:]}"
    assert "Traceback" not in finished.stderr
    data = json.loads((out / "transcript.json").read_text("utf-8"))
    labels = [interaction["label"] for interaction in data["interactions"]]
    assert labels == [
        "/imagine",
        "Info button",
        "/admin modlog",
        "/admin blocklist add",
        "/imagine",
        "Ban 24 h button",
        "/imagine",
    ]
    blocked = data["interactions"][4]
    assert "rules don't allow" in data["summary"]["blocked prompt"]
    assert any("Appeal" in label for e in blocked["events"] for label in e.get("buttons") or [])
    assert data["summary"]["after the ban"].startswith("⛔ You may not use the bot in this server until")
    entry = [
        e for e in data["other_messages"] if e.get("embeds") and "Prompt blocked" in e["embeds"][0]["title"]
    ]
    assert entry[0]["buttons"] == ["Ban 24 h", "Dismiss"] and entry[0]["event"] == "created"
    decided = entry[-1]["embeds"][0]["fields"]
    assert any(f["name"] == "Decision" and f["value"].startswith("🔨 Banned for 24 h") for f in decided)
    markdown = (out / "transcript.md").read_text("utf-8")
    # As a Discord client shows it: names, not ids.
    assert "- **Member**: @demo-user" in markdown and "by @demo-moderator" in markdown
    assert "#mod-log message" in markdown


# ---- the recorder, without a server: what it makes of edits it could not see one by one --------------


@dataclass
class _FakeStandIn:
    messages: dict[int, StoredMessage] = field(default_factory=dict)


def test_recorder_keeps_edits_that_came_too_close_together_for_a_snapshot() -> None:
    stand_in = _FakeStandIn()
    recorder = TranscriptRecorder(cast(DiscordStandIn, stand_in))
    message = StoredMessage(id=10, channel_id=1, guild_id=2, author={"id": "3"}, created_at=100.0)
    stand_in.messages[message.id] = message
    recorder.observe()

    message.edits.append((101.0, {"content": "📨 Queued"}))
    message.content = "🎨 Generating"
    message.edits.append((102.0, {"content": "🎨 Generating"}))
    recorder.observe()
    recorder.observe()  # nothing new: nothing recorded twice

    kinds = [(e.kind, e.at, e.observed, e.content) for e in recorder.message_events(message.id)]
    assert kinds == [
        ("created", 100.0, True, ""),
        ("edited", 101.0, False, "📨 Queued"),
        ("edited", 102.0, True, "🎨 Generating"),
    ]
    data: dict[str, Any] = build_transcript(recorder, cast(DiscordStandIn, stand_in), 100.0, {})
    assert [e["t"] for e in data["other_messages"]] == [0.0, 1.0, 2.0]
    markdown = render_markdown(data)
    assert "only the bot's edit request was captured" in markdown
    assert "🎨 Generating" in markdown
