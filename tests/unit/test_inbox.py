"""The inbox between caller threads and the dispatcher thread: real threads and a real
eventfd; nothing posted is lost, and a burst of posts costs one wake-up."""

from __future__ import annotations

import os
import select
import threading

import pytest

import workerpool as wp
from workerpool.pool.inbox import Inbox


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_items_come_out_in_order_and_a_burst_wakes_once():
    inbox = Inbox()
    try:
        assert not readable(inbox.fd)
        for i in range(100):
            inbox.post(i)
        assert os.eventfd_read(inbox.fd) == 1  # one write for the whole burst
        os.eventfd_write(inbox.fd, 1)  # (put back what the check took)
        assert list(inbox.drain()) == list(range(100))
        assert not readable(inbox.fd)
        inbox.post("next")  # the first post after a drain wakes the thread again
        assert readable(inbox.fd) and list(inbox.drain()) == ["next"]
    finally:
        inbox.release()


def test_close_refuses_later_posts_and_hands_back_what_is_left():
    inbox = Inbox()
    try:
        inbox.post("a")
        inbox.post("b")
        assert inbox.close() == ["a", "b"]
        with pytest.raises(wp.PoolClosed):
            inbox.post("c")
        assert list(inbox.drain()) == []
    finally:
        inbox.release()


def test_nothing_posted_from_many_threads_is_ever_left_unread():
    """Posters race a dispatcher that drains on every wake-up and finally closes: every
    item is either drained, handed back by close, or refused to its poster."""
    inbox = Inbox()
    posted, refused, seen = [], [], []
    stop = threading.Event()

    def poster(n: int):
        for i in range(2000):
            try:
                inbox.post((n, i))
                posted.append((n, i))
            except wp.PoolClosed:
                refused.append((n, i))

    def dispatcher():
        while not stop.is_set():
            if select.select([inbox.fd], [], [], 0.01)[0]:
                seen.extend(inbox.drain())
        seen.extend(inbox.close())

    thread = threading.Thread(target=dispatcher)
    thread.start()
    posters = [threading.Thread(target=poster, args=(n,)) for n in range(4)]
    for p in posters:
        p.start()
    posters[0].join()
    stop.set()  # close while the others may still be posting
    thread.join()
    for p in posters:
        p.join()
    inbox.release()
    assert sorted(seen) == sorted(posted)
    assert len(posted) + len(refused) == 4 * 2000
