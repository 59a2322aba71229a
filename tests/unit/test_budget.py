"""--max-memory's policy: past the budget, the least recently used models release their idle
workers first, and only as many models as it takes."""

from __future__ import annotations

import pytest

pytest.importorskip("uvicorn")

from workerpool.errors import ConfigError  # noqa: E402
from workerpool.serve.budget import MemoryBudget  # noqa: E402
from workerpool.serve.settings import ServerSettings, parse_size  # noqa: E402
from workerpool.serving.model import ModelState  # noqa: E402

MIB = 1024 * 1024


class ServedPool:
    """What the budget reads of a pool: its workers' PSS, and the release it asks for."""

    def __init__(self, workers: dict[int, int]):
        self.workers = dict(workers)  # pid -> PSS
        self.released: list[int] = []

    def stats(self):
        return {"workers": [{"pid": pid, "pss": pss} for pid, pss in self.workers.items()]}

    def release_idle_workers(self):
        stopped, self.workers = list(self.workers), {}
        self.released += stopped
        return stopped


class Served:
    def __init__(self, name: str, last_used: float, workers: dict[int, int]):
        self.name, self.version, self.last_used = name, "1", last_used
        self.state = ModelState.LOADED
        self.pool = ServedPool(workers)


class Models:
    def __init__(self, *models):
        self.models = list(models)


def test_the_least_recently_used_models_release_first_and_only_as_many_as_needed():
    recent = Served("recent", 30.0, {1: 40 * MIB})
    oldest = Served("oldest", 10.0, {2: 40 * MIB, 3: 40 * MIB})
    middle = Served("middle", 20.0, {4: 40 * MIB})
    budget = MemoryBudget(Models(recent, oldest, middle), max_bytes=200 * MIB,
                          measure=lambda: 290 * MIB)
    assert budget.check() == ["oldest@1", "middle@1"]  # 290 - 80 - 40 = 170 <= 200
    assert oldest.pool.released == [2, 3] and middle.pool.released == [4]
    assert recent.pool.released == [] and budget.releases == 3


def test_under_the_budget_nothing_is_released_and_unloaded_models_are_passed_over():
    idle = Served("idle", 0.0, {1: 40 * MIB})
    budget = MemoryBudget(Models(idle), max_bytes=200 * MIB, measure=lambda: 100 * MIB)
    assert budget.check() == [] and idle.pool.released == []
    idle.state = ModelState.UNLOADING
    budget.measure = lambda: 300 * MIB
    assert budget.check() == [] and idle.pool.released == []


@pytest.mark.parametrize("text, size", [
    ("6GiB", 6 * 1024 ** 3), ("512 MiB", 512 * MIB), ("2G", 2 * 1000 ** 3),
    ("1.5gi", int(1.5 * 1024 ** 3)), (4096, 4096), ("100", 100)])
def test_sizes(text, size):
    assert parse_size(text) == size
    assert ServerSettings(max_memory=text).max_memory == size


@pytest.mark.parametrize("bad", ["lots", "-1GiB", "0", 0, True, "5 GB of RAM", 1.5])
def test_a_size_that_is_not_one_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="max_memory"):
        ServerSettings(max_memory=bad)
