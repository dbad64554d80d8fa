"""The service's memory budget: jobs are admitted by an estimate made from the declared size
of their media (before any pixel is decoded), so that large photos never run together."""

from __future__ import annotations

import threading
from dataclasses import replace

from engines.registry import available_categories
from gateway.jobs import MemoryBudget, estimated_bytes
from gateway.settings import Settings
from gateway.store import Job

MIB = 1024 * 1024

JOB = Job(seq=1, id="med_x", key_id="key_x", status="queued", kind="image",
          filename="photo.jpg", ext=".jpg", size_bytes=24 * MIB, media_seconds=0.0,
          width=4627, height=4627, categories=["faces"], options={}, webhook_url=None,
          base_url="http://test/", progress=0.0, result=None, error_code=None,
          error_message=None, attempts=1, created_at=0.0, started_at=None,
          completed_at=None, expires_at=None, expired=False, deleted=False)


def default_budget() -> MemoryBudget:
    return MemoryBudget(Settings().work_memory_mb * MIB)


def test_two_huge_photos_never_run_at_once() -> None:
    """A 21-megapixel photo (a 24 MB upload) runs alone under the default budget: a second
    one waits until the first is done."""
    budget = default_budget()
    need = estimated_bytes(JOB)
    assert need >= 600 * MIB  # its measured working memory, not a fraction of it
    entered = threading.Event()

    def second() -> None:
        with budget.hold(need):
            entered.set()

    with budget.hold(need):  # one job always runs, however large
        t = threading.Thread(target=second, daemon=True)
        t.start()
        assert not entered.wait(0.3)
        assert budget.running == 1
    assert entered.wait(10)
    t.join(10)
    assert budget.running == 0 and budget.used == 0


def test_the_face_pass_cap_makes_a_megapixel_photo_cost_like_a_huge_one() -> None:
    """Small faces are looked for at 2x and 3x, up to a 3840x2160 model input: a 1-megapixel
    photo needs nearly as much as a 21-megapixel one, and two of them do not fit either."""
    one_mp = replace(JOB, width=1000, height=1000)
    assert estimated_bytes(one_mp) > estimated_bytes(JOB) * 0.8
    assert 2 * estimated_bytes(one_mp) > default_budget().limit


def test_small_photos_run_side_by_side() -> None:
    small = replace(JOB, width=400, height=267)
    assert 2 * estimated_bytes(small) <= default_budget().limit


def test_more_categories_need_more_memory() -> None:
    every = replace(JOB, categories=list(available_categories()))
    assert estimated_bytes(every) >= estimated_bytes(JOB)


def test_video_estimate_covers_its_frames() -> None:
    video = replace(JOB, kind="video", width=1920, height=1080)
    assert estimated_bytes(video) > 1920 * 1080 * 3 * 64
